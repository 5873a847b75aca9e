"""The cost of serving an adapter at rank r: prefill and decode latency against the base model.

For each batch size, every variant below is timed once per round. The order alternates
direction from round to round (A B C, C B A, ...), and each ratio is taken to the base
model timed in the same round. The tables report medians over rounds:

- ``base``: the base model alone, the denominator of every ratio;
- ``matlora@r``: one hierarchical adapter served at rank r (rank 0 runs the adapter
  layers' wrappers with no adapter work);
- ``peft@r``: the same adapter exported at rank r (``matlora.export_peft``) and run by
  PEFT, unmerged, with the adapter weights in the base dtype as matlora keeps them;
- ``merged``: the rank-R adapter merged into the weights by PEFT's ``merge_and_unload``,
  which costs nothing per token but fixes the rank;
- ``matlora mixed`` (batch > 1 only): one batch whose rows ask for different ranks.

The floor is the multiply-add count of the base model plus the rank-r adapter, over the
base model's count, from the model's shapes. A profile of one decode step at rank R and of
the base model, by torch.profiler, shows where the time goes.

Timing does not depend on the adapter's values, so by default the adapter is random, with
R=32 on all seven projections. ``--adapter DIR`` times a trained one.

    python -m bench.serving_cost          # about 8 minutes on a 2-core CPU
    python -m bench.serving_cost --smoke  # under a minute, tiny random model
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common

logger = logging.getLogger(__name__)

NAME = "serving_cost"
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_NAME = "bench"
# The goals the tables are checked against.
FLOOR_TOLERANCE = 0.03
PEFT_TOLERANCE = 0.02


@dataclass(frozen=True)
class ServingConfig:
    """Timing settings. The defaults are the CPU configuration of about 8 minutes."""

    base: str = "smollm2-135m"
    adapter: str | None = None
    max_rank: int = 32
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    ranks: tuple[int, ...] = (0, 1, 2, 4, 8, 16)
    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_tokens: int = 64
    decode_tokens: int = 16
    rounds: int = 15
    dtype: str = "auto"
    profile_steps: int = 8

    @classmethod
    def preset(cls, name: str) -> ServingConfig:
        if name == "smoke":
            return cls(
                max_rank=8,
                target_modules=("q_proj", "v_proj"),
                ranks=(0, 1, 4),
                prompt_tokens=16,
                decode_tokens=4,
                rounds=3,
                profile_steps=2,
            )
        if name == "full":
            return cls(batch_sizes=(1, 8, 32), prompt_tokens=128, decode_tokens=32, rounds=40)
        if name == "default":
            return cls()
        raise ValueError(f"preset must be smoke, default or full, got {name!r}")

    def served_ranks(self, max_rank: int) -> list[int]:
        """Return the ranks to time: the configured ones up to R, and R itself."""
        return sorted({rank for rank in self.ranks if rank <= max_rank} | {max_rank})


@dataclass
class Variant:
    """One way of running the model; ``enter(batch_size)`` returns the context to run its forwards in."""

    name: str
    kind: str
    rank: int | None
    model: Any
    enter: Callable[[int], contextlib.AbstractContextManager]
    min_batch: int = 1


# Floor


def count_macs(model, target_modules: Sequence[str]) -> dict[str, int]:
    """Count, from the model's shapes, the multiply-adds per token of its parts.

    Returns ``linear`` (every linear layer but the output head), ``head``, ``attention``
    and ``adapter_per_rank``. ``attention`` counts per token and per key attended to:
    2 x heads x head_dim x layers, for the scores and the weighted sum. ``adapter_per_rank``
    is the sum of in + out features over the targeted layers.
    """
    from torch import nn

    linear = head = adapter_per_rank = 0
    head_module = model.get_output_embeddings()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        macs = module.in_features * module.out_features
        if module is head_module:
            head += macs
            continue
        linear += macs
        # In a model with adapters, the original layer sits at `<name>.base_layer`.
        name = name.removesuffix(".base_layer")
        if any(name == target or name.endswith("." + target) for target in target_modules):
            adapter_per_rank += module.in_features + module.out_features
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 2 * config.num_attention_heads * head_dim * config.num_hidden_layers
    return {"linear": linear, "head": head, "attention": attention, "adapter_per_rank": adapter_per_rank}


def floor_ratios(macs: dict[str, int], rank: int, prompt_tokens: int, decode_tokens: int) -> dict[str, float]:
    """Return the multiply-add ratio (base + rank-r adapter) / base for a prefill and for a decode step.

    The prefill computes logits for its last position only. Its attention is causal, so
    position i attends to i keys. A decode step attends to the prompt plus the tokens so
    far, on average ``prompt_tokens + (decode_tokens + 1) / 2`` keys.
    """
    adapter = rank * macs["adapter_per_rank"]
    prefill_base = (
        prompt_tokens * macs["linear"] + macs["head"] + macs["attention"] * prompt_tokens * (prompt_tokens + 1) / 2
    )
    decode_context = prompt_tokens + (decode_tokens + 1) / 2
    decode_base = macs["linear"] + macs["head"] + macs["attention"] * decode_context
    return {
        "prefill": 1 + prompt_tokens * adapter / prefill_base,
        "decode": 1 + adapter / decode_base,
    }


# Models and variants


def load_variants(config: ServingConfig, adapter_dir: Path, work_dir: Path, device: str) -> tuple[list[Variant], dict]:
    """Load the base model four times (base, matlora, PEFT, merged) and return the variants with a description."""
    import torch
    from peft import PeftModel

    import matlora
    from matlora.base_model import load_base

    base, _ = load_base(config.base, dtype=config.dtype, device=device)
    served, _ = load_base(config.base, dtype=config.dtype, device=device)
    adapter_config = matlora.load_adapter(served, adapter_dir, ADAPTER_NAME)
    ranks = config.served_ranks(adapter_config.r)

    exports = {
        rank: matlora.export_peft(adapter_dir, rank, work_dir / "peft" / f"rank{rank}") for rank in ranks if rank >= 1
    }
    peft_base, _ = load_base(config.base, dtype=config.dtype, device=device)
    first, *others = sorted(exports)
    peft_model = PeftModel.from_pretrained(
        peft_base, exports[first], adapter_name=f"r{first}", autocast_adapter_dtype=False
    )
    for rank in others:
        peft_model.load_adapter(exports[rank], adapter_name=f"r{rank}", autocast_adapter_dtype=False)
    peft_model.eval()

    merged_base, _ = load_base(config.base, dtype=config.dtype, device=device)
    merged = PeftModel.from_pretrained(
        merged_base, exports[adapter_config.r], autocast_adapter_dtype=False
    ).merge_and_unload()

    variants = [Variant("base", "base", None, base, _no_context)]
    variants += [
        Variant(f"matlora@{rank}", "matlora", rank, served, lambda _, rank=rank: matlora.at_rank(rank, ADAPTER_NAME))
        for rank in ranks
    ]
    variants += [
        Variant(f"peft@{rank}", "peft", rank, peft_model, lambda _, rank=rank: _peft_at(peft_model, rank))
        for rank in sorted(exports)
    ]
    variants.append(Variant("merged", "merged", adapter_config.r, merged, _no_context))
    # Rows cycle through the served ranks, so a batch of 8 mixes up to 8 of them.
    variants.append(
        Variant(
            "matlora mixed",
            "mixed",
            None,
            served,
            lambda batch: matlora.at_rank(mixed_ranks(ranks, batch), ADAPTER_NAME),
            min_batch=2,
        )
    )
    lora_a = next(p for n, p in peft_model.named_parameters() if "lora_A" in n)
    description = {
        "adapter": common.display_path(adapter_dir),
        "max_rank": adapter_config.r,
        "target_modules": adapter_config.target_modules,
        "ranks": ranks,
        "dtype": str(next(base.parameters()).dtype).removeprefix("torch."),
        "peft_adapter_dtype": str(lora_a.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
    return variants, description


def _peft_at(peft_model, rank: int) -> contextlib.AbstractContextManager:
    peft_model.set_adapter(f"r{rank}")
    return contextlib.nullcontext()


def _no_context(batch_size: int) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def mixed_ranks(ranks: Sequence[int], batch_size: int) -> list[int]:
    """Return one rank per row, cycling through ``ranks``."""
    return [ranks[row % len(ranks)] for row in range(batch_size)]


# Timing


def time_generation(model, input_ids, decode_tokens: int, synchronize: Callable[[], None]) -> tuple[float, float]:
    """Return the prefill time and the median time of one decode step, in seconds.

    The prefill computes the logits of the last position only, as generation does.
    """
    import torch

    with torch.inference_mode():
        synchronize()
        started = time.perf_counter()
        output = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        token = output.logits[:, -1:].argmax(-1)
        synchronize()
        prefill = time.perf_counter() - started

        cache = output.cache
        steps = []
        for _ in range(decode_tokens):
            started = time.perf_counter()
            output = model(input_ids=token, cache=cache, use_cache=True)
            token = output.logits[:, -1:].argmax(-1)
            synchronize()
            steps.append(time.perf_counter() - started)
    return prefill, common.median(steps)


def measure(variants: Sequence[Variant], config: ServingConfig, device: str, vocab_size: int) -> dict[str, Any]:
    """Time every variant once per round at each batch size; return the raw times by batch size and variant."""
    import torch

    synchronize = torch.cuda.synchronize if device.startswith("cuda") else _no_op
    generator = torch.Generator().manual_seed(0)
    measured: dict[str, Any] = {}
    for batch_size in config.batch_sizes:
        active = [variant for variant in variants if batch_size >= variant.min_batch]
        # Token ids do not change the cost; stay clear of the special tokens at both ends of the vocabulary.
        input_ids = torch.randint(10, vocab_size - 10, (batch_size, config.prompt_tokens), generator=generator)
        input_ids = input_ids.to(device)
        times = {variant.name: {"prefill": [], "decode": []} for variant in active}
        for round_index in range(-1, config.rounds):
            # Round -1 warms up every variant (allocator, kernels, caches) and is not kept.
            for variant in common.round_order(active, max(round_index, 0)):
                with variant.enter(batch_size):
                    prefill, decode = time_generation(variant.model, input_ids, config.decode_tokens, synchronize)
                if round_index >= 0:
                    times[variant.name]["prefill"].append(prefill)
                    times[variant.name]["decode"].append(decode)
            if round_index >= 0:
                logger.info("batch %d: round %d of %d done", batch_size, round_index + 1, config.rounds)
        measured[str(batch_size)] = times
    return measured


def _no_op() -> None:
    return None


@contextlib.contextmanager
def labelled_adapter_calls(model) -> Iterator[None]:
    """Label each adapter's low-rank work as ``matlora.prefix_delta`` in torch.profiler traces.

    Only the outermost call of a layer is labelled: a lone batch row runs through
    ``prefix_delta`` twice (once as two rows), and nested labels would count its time twice.
    """
    import torch

    from matlora.layer import AdapterWeights

    patched = []
    for module in model.modules():
        if not isinstance(module, AdapterWeights):
            continue
        inside = [False]

        def labelled(*args, _original=module.prefix_delta, _inside=inside, **kwargs):
            if _inside[0]:
                return _original(*args, **kwargs)
            _inside[0] = True
            try:
                with torch.profiler.record_function("matlora.prefix_delta"):
                    return _original(*args, **kwargs)
            finally:
                _inside[0] = False

        module.prefix_delta = labelled
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.prefix_delta


def profile_decode(variant: Variant, config: ServingConfig, device: str, vocab_size: int) -> dict[str, Any]:
    """Profile ``config.profile_steps`` batch-1 decode steps of a variant and return its top operators."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    input_ids = torch.randint(
        10, vocab_size - 10, (1, config.prompt_tokens), generator=torch.Generator().manual_seed(1)
    )
    model = variant.model
    with torch.inference_mode(), variant.enter(1), labelled_adapter_calls(model):
        output = model(input_ids=input_ids.to(device), use_cache=True, logits_to_keep=1)
        token = output.logits[:, -1:].argmax(-1)
        cache = output.cache
        with profile(activities=activities) as profiler:
            started = time.perf_counter()
            for _ in range(config.profile_steps):
                output = model(input_ids=token, cache=cache, use_cache=True)
                token = output.logits[:, -1:].argmax(-1)
            elapsed = time.perf_counter() - started

    steps = config.profile_steps
    averages = profiler.key_averages()
    total_self = sum(event.self_cpu_time_total for event in averages) or 1.0
    top = sorted(averages, key=lambda event: event.self_cpu_time_total, reverse=True)[:25]
    adapter = next((event for event in averages if event.key == "matlora.prefix_delta"), None)
    return {
        "variant": variant.name,
        "steps": steps,
        "step_ms_profiled": 1000 * elapsed / steps,
        "operator_calls_per_step": sum(event.count for event in averages if event.key.startswith("aten::")) / steps,
        "adapter_ms_per_step": None if adapter is None else adapter.cpu_time_total / 1000 / steps,
        "top_operators": [
            {
                "name": event.key,
                "calls_per_step": event.count / steps,
                "self_cpu_ms_per_step": event.self_cpu_time_total / 1000 / steps,
                "cpu_total_ms_per_step": event.cpu_time_total / 1000 / steps,
                "self_cpu_share": event.self_cpu_time_total / total_self,
            }
            for event in top
        ],
        "table": averages.table(sort_by="self_cpu_time_total", row_limit=25),
    }


# Summary


def summarize(
    config: ServingConfig, measured: dict[str, Any], variants: Sequence[Variant], macs: dict[str, int]
) -> dict:
    """Turn raw times into medians, ratios to the base model of the same round, floors and goal checks."""
    kinds = {variant.name: variant for variant in variants}
    ranks = sorted({variant.rank for variant in variants if variant.kind == "matlora"})
    batches = {}
    for batch_size, times in measured.items():
        base = times["base"]
        rows = {}
        for name, series in times.items():
            variant = kinds[name]
            row = {"kind": variant.kind, "rank": variant.rank}
            for phase in ("prefill", "decode"):
                ratios = [value / reference for value, reference in zip(series[phase], base[phase])]
                row[f"{phase}_ms"] = 1000 * common.median(series[phase])
                row[f"{phase}_ratio"] = common.median(ratios)
            row.update(_floor(variant, macs, config, ranks, int(batch_size)))
            rows[name] = row
        batches[batch_size] = {"variants": rows, "goals": _goal_checks(rows, ranks)}
    return {"batches": batches, "ranks": ranks}


def _floor(variant: Variant, macs: dict[str, int], config: ServingConfig, ranks: list[int], batch: int) -> dict:
    if variant.kind in ("base", "merged"):
        rank = 0
    elif variant.kind == "mixed":
        rows = mixed_ranks(ranks, batch)
        rank = sum(rows) / len(rows)
    else:
        rank = variant.rank
    floors = floor_ratios(macs, rank, config.prompt_tokens, config.decode_tokens)
    return {"prefill_floor": floors["prefill"], "decode_floor": floors["decode"]}


def _goal_checks(rows: dict[str, dict], ranks: list[int]) -> dict[str, Any]:
    """Check, per phase, matlora against PEFT (at ranks >= 1) and against the floor (at every rank)."""
    checks = {}
    for phase in ("prefill", "decode"):
        slower_than_peft, above_floor = [], []
        for rank in ranks:
            ours = rows[f"matlora@{rank}"][f"{phase}_ratio"]
            if ours > rows[f"matlora@{rank}"][f"{phase}_floor"] + FLOOR_TOLERANCE:
                above_floor.append(rank)
            peft = rows.get(f"peft@{rank}")
            if peft is not None and ours > peft[f"{phase}_ratio"] * (1 + PEFT_TOLERANCE):
                slower_than_peft.append(rank)
        checks[phase] = {"ranks_slower_than_peft": slower_than_peft, "ranks_above_floor": above_floor}
    return checks


# Output


def render_markdown(result: dict[str, Any]) -> str:
    config = result["config"]
    setup = result["setup"]
    parts = [
        f"Adapter R={setup['max_rank']} on {', '.join(setup['target_modules'])}, {setup['dtype']} "
        f"(PEFT adapter weights {setup['peft_adapter_dtype']}), prompt of {config['prompt_tokens']} tokens, "
        f"{config['decode_tokens']} decode steps, median of {config['rounds']} interleaved rounds. Ratios are to "
        f"the base model timed in the same round; the floor is (base + adapter multiply-adds) / base.",
    ]
    for batch_size, batch in result["batches"].items():
        rows = batch["variants"]
        base = rows["base"]
        parts += [
            "",
            f"### Batch {batch_size}: base model {base['prefill_ms']:.1f} ms per prefill, "
            f"{base['decode_ms']:.2f} ms per decode step",
            "",
            _ratio_table(rows, result["ranks"]),
            "",
            _others_line(rows),
            "",
            *_goal_lines(batch["goals"]),
        ]
    parts += ["", "### Where a decode step's time goes (batch 1, torch.profiler)", "", *_profile_lines(result)]
    parts += ["", common.environment_note(result.get("environment", {}))]
    return "\n".join(parts)


def _ratio_table(rows: dict[str, dict], ranks: Sequence[int]) -> str:
    table = []
    for rank in ranks:
        ours, peft = rows[f"matlora@{rank}"], rows.get(f"peft@{rank}", {})
        table.append(
            [
                str(rank),
                common.fmt(ours["prefill_floor"]),
                common.fmt(ours["prefill_ratio"]),
                common.fmt(peft.get("prefill_ratio")),
                common.fmt(ours["decode_floor"]),
                common.fmt(ours["decode_ratio"]),
                common.fmt(peft.get("decode_ratio")),
            ]
        )
    headers = [
        "rank",
        "prefill floor",
        "prefill matlora",
        "prefill PEFT",
        "decode floor",
        "decode matlora",
        "decode PEFT",
    ]
    return common.markdown_table(headers, table)


def _others_line(rows: dict[str, dict]) -> str:
    merged = rows["merged"]
    line = f"Merged (rank fixed): prefill {common.fmt(merged['prefill_ratio'])}, decode {common.fmt(merged['decode_ratio'])}."
    mixed = rows.get("matlora mixed")
    if mixed is not None:
        line += (
            f" One batch of mixed ranks: prefill {common.fmt(mixed['prefill_ratio'])} "
            f"(floor {common.fmt(mixed['prefill_floor'])}), decode {common.fmt(mixed['decode_ratio'])} "
            f"(floor {common.fmt(mixed['decode_floor'])})."
        )
    return line


def _goal_lines(goals: dict[str, Any]) -> list[str]:
    lines = []
    for phase, check in goals.items():
        slower, above = check["ranks_slower_than_peft"], check["ranks_above_floor"]
        peft_text = (
            "no slower than PEFT at every rank"
            if not slower
            else f"slower than PEFT by more than {PEFT_TOLERANCE:.0%} at ranks {slower}"
        )
        floor_text = (
            f"within {FLOOR_TOLERANCE:.0%} of the floor at every rank"
            if not above
            else f"more than {FLOOR_TOLERANCE:.0%} above the floor at ranks {above}"
        )
        lines.append(f"- {phase}: matlora is {peft_text}, and {floor_text}.")
    return lines


def _profile_lines(result: dict[str, Any]) -> list[str]:
    profiles = result.get("profile", {})
    ours, base = profiles.get("matlora"), profiles.get("base")
    if not ours or not base:
        return ["No profile was taken."]
    extra_calls = ours["operator_calls_per_step"] - base["operator_calls_per_step"]
    extra_ms = ours["step_ms_profiled"] - base["step_ms_profiled"]
    lines = [
        f"At rank {result['setup']['max_rank']} a decode step took {ours['step_ms_profiled']:.2f} ms under the profiler "
        f"with {ours['operator_calls_per_step']:.0f} aten operator calls; the base model's took "
        f"{base['step_ms_profiled']:.2f} ms with {base['operator_calls_per_step']:.0f}. The adapter work "
        f"(`matlora.prefix_delta`) took {common.fmt(ours['adapter_ms_per_step'], 2)} ms per step. The "
        f"{extra_calls:.0f} extra calls cost {extra_ms:.2f} ms in all, about "
        f"{1000 * extra_ms / max(extra_calls, 1):.1f} µs each. The multiply-add floor does not count this per-call cost.",
        "",
    ]
    table = [
        [
            f"`{op['name']}`",
            f"{op['calls_per_step']:.0f}",
            f"{op['self_cpu_ms_per_step']:.3f}",
            f"{op['self_cpu_share']:.1%}",
        ]
        for op in ours["top_operators"][:12]
    ]
    lines.append(common.markdown_table(["operator (matlora, top by self time)", "calls", "self ms", "share"], table))
    lines += ["", f"Full tables: `{NAME}_profile.txt`."]
    return lines


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = result["batches"]
    figure, axes = plt.subplots(len(batches), 2, figsize=(10, 3.6 * len(batches)), squeeze=False)
    ranks = result["ranks"]
    for row_axes, (batch_size, batch) in zip(axes, batches.items()):
        rows = batch["variants"]
        for axis, phase in zip(row_axes, ("prefill", "decode")):
            xs = [_plot_x(rank) for rank in ranks]
            axis.plot(
                xs, [rows[f"matlora@{rank}"][f"{phase}_floor"] for rank in ranks], ":", color="black", label="floor"
            )
            axis.plot(xs, [rows[f"matlora@{rank}"][f"{phase}_ratio"] for rank in ranks], "-o", label="matlora")
            peft_ranks = [rank for rank in ranks if f"peft@{rank}" in rows]
            axis.plot(
                [_plot_x(rank) for rank in peft_ranks],
                [rows[f"peft@{rank}"][f"{phase}_ratio"] for rank in peft_ranks],
                "-s",
                label="PEFT unmerged",
            )
            axis.axhline(rows["merged"][f"{phase}_ratio"], color="grey", linestyle="--", label="merged")
            axis.set_xticks(xs, [str(rank) for rank in ranks])
            axis.set_xlabel("rank")
            axis.set_ylabel("time / base model")
            axis.set_title(f"{phase}, batch {batch_size}", fontsize=10)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
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
        prog="python -m bench.serving_cost",
        description="Time prefill and decode at each rank against the base model, PEFT unmerged, a merged "
        "adapter and the multiply-add floor.",
    )
    common.add_common_arguments(parser)
    parser.add_argument("--work-dir", type=Path, default=None, help="folder for the random and exported adapters")
    parser.add_argument("--base", default=None, help="base model (default: smollm2-135m; a tiny model with --smoke)")
    parser.add_argument("--adapter", default=None, help="adapter folder to time (default: a random one)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: the preset's)")
    parser.add_argument(
        "--batch-sizes", type=_int_list, default=None, help="batch sizes, comma-separated (default: the preset's)"
    )
    return parser


def config_from_args(args: argparse.Namespace, tiny_base: Path | None) -> ServingConfig:
    config = ServingConfig.preset(common.preset_name(args))
    overrides: dict[str, Any] = {}
    if tiny_base is not None:
        overrides["base"] = str(tiny_base)
    for field, value in (
        ("base", args.base),
        ("adapter", args.adapter),
        ("rounds", args.rounds),
        ("batch_sizes", args.batch_sizes),
    ):
        if value is not None:
            overrides[field] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(config, **overrides)


def run(config: ServingConfig, work_dir: Path, device: str) -> dict[str, Any]:
    """Load the variants, time them, profile one decode step, and return the result."""
    started = time.perf_counter()
    adapter_dir = Path(config.adapter) if config.adapter else None
    if adapter_dir is None:
        adapter_dir = common.build_random_adapter(
            config.base, config.max_rank, config.target_modules, work_dir / "random-adapter"
        )
    variants, setup = load_variants(config, adapter_dir, work_dir, device)
    base_model = variants[0].model
    vocab_size = base_model.config.vocab_size
    macs = count_macs(base_model, setup["target_modules"])

    measured = measure(variants, config, device, vocab_size)
    by_name = {variant.name: variant for variant in variants}
    profiles = {
        "matlora": profile_decode(by_name[f"matlora@{setup['max_rank']}"], config, device, vocab_size),
        "base": profile_decode(by_name["base"], config, device, vocab_size),
    }
    return {
        "benchmark": NAME,
        "config": dataclasses.asdict(config),
        "setup": setup,
        "macs_per_token": macs,
        **summarize(config, measured, variants, macs),
        "profile": {name: {k: v for k, v in data.items() if k != "table"} for name, data in profiles.items()},
        "profile_tables": {name: data["table"] for name, data in profiles.items()},
        "times": measured,
        "seconds": round(time.perf_counter() - started, 1),
    }


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
    environment = common.environment(device)
    result = {"environment": environment, **run(config, work_dir, device)}

    out_dir = common.results_dir(args)
    tables = result.pop("profile_tables")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{NAME}_profile.txt").write_text(
        "".join(
            f"== {name}: {result['profile'][name]['variant']}, one batch-1 decode step x "
            f"{result['profile'][name]['steps']} ==\n{table}\n"
            for name, table in tables.items()
        )
    )
    plot(result, out_dir / f"{NAME}.png")
    print(common.write_outputs(NAME, result, out_dir, render_markdown))
    return 0


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    sys.exit(main())
