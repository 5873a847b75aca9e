"""Helpers shared by the benchmarks: output folders, the machine's description, tables, interleaving."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import re
import statistics
import subprocess
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
# Training runs and other intermediate files; /runs/ is git-ignored.
WORK_DIR = REPO_ROOT / "runs" / "bench"
# Smoke runs write here, so they never overwrite the committed results.
SMOKE_DIR = REPO_ROOT / "runs" / "bench-smoke"
# The pages whose <!-- bench:NAME --> sections show the committed results.
READMES = (REPO_ROOT / "bench" / "README.md", REPO_ROOT / "README.md")
ARITHMETIC_TASK = REPO_ROOT / "data" / "bigbench-arithmetic" / "2_digit_addition" / "task.json"

logger = logging.getLogger(__name__)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags every benchmark takes: the size preset, the device, logging and the output folder."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--smoke",
        action="store_true",
        help="a minutes-long run on a tiny model that checks the plumbing; writes under runs/bench-smoke/",
    )
    size.add_argument("--full", action="store_true", help="the longer configuration (hours on CPU; meant for a GPU)")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)"
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="folder for the JSON, PNG and Markdown results (default: bench/results, or runs/bench-smoke/results)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"], help="logging level (default: INFO)"
    )


def preset_name(args: argparse.Namespace) -> str:
    if args.smoke:
        return "smoke"
    if args.full:
        return "full"
    return "default"


def results_dir(args: argparse.Namespace) -> Path:
    if args.results_dir is not None:
        return args.results_dir
    return SMOKE_DIR / "results" if args.smoke else RESULTS_DIR


def work_dir(args: argparse.Namespace, name: str) -> Path:
    """Return the folder for a benchmark's intermediate files: ``--work-dir``, else one per preset."""
    explicit = getattr(args, "work_dir", None)
    if explicit is not None:
        return explicit
    return SMOKE_DIR / name if args.smoke else WORK_DIR / f"{name}-{preset_name(args)}"


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO, which would bury the benchmark's own progress lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested, but torch finds no CUDA device; use --device cpu")
    return name


def environment(device: str) -> dict[str, Any]:
    """Describe the machine and software a measurement ran on, for the results' hardware note."""
    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "git_commit": _git(["rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(_git(["status", "--porcelain", "--untracked-files=no"])),
        # A load average near the CPU count means other work shared the machine during the run.
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def environment_note(info: dict[str, Any]) -> str:
    """Return one Markdown line with where and when a result was measured."""
    where = info.get("gpu") or f"{info.get('cpu')} ({info.get('logical_cpus')} logical CPUs)"
    commit = info.get("git_commit") or "unknown"
    if info.get("git_dirty"):
        commit += " with local changes"
    load = info.get("load_average_at_start")
    load_text = f", load average {load[0]} at start" if load else ""
    return (
        f"Measured {info.get('date', '?')[:10]} on {where}, {info.get('device')}, torch {info.get('torch')}, "
        f"commit {commit}{load_text}."
    )


def build_random_adapter(base: str, max_rank: int, target_modules: Sequence[str], directory: Path) -> Path:
    """Save a random hierarchical adapter for ``base`` in ``directory`` (once) and return the folder.

    Latency does not depend on the adapter's values, only on its shape. ``lora_B`` gets
    small random values in place of its zero initialisation, so the adapter changes the
    model's output as a trained one does.
    """
    import torch

    import matlora

    if (directory / "adapter_config.json").is_file():
        saved = matlora.AdapterConfig.load(directory)
        if saved.r == max_rank and saved.target_modules == list(target_modules):
            return directory
    from matlora.base_model import load_base
    from matlora.serialization import base_model_fingerprint

    model, _ = load_base(base, device="cpu")
    config = matlora.AdapterConfig(
        r=max_rank,
        target_modules=list(target_modules),
        method="matryoshka",
        base_model_name_or_path=base,
        base_model_fingerprint=base_model_fingerprint(model),
    )
    matlora.inject_adapter(model, config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, matlora.MatryoshkaLinear):
                lora_b = module.adapters[matlora.DEFAULT_ADAPTER].lora_B
                lora_b.copy_(torch.randn(lora_b.shape, generator=generator) * 0.01)
    matlora.save_adapter(model, directory)
    return directory


def write_outputs(name: str, result: dict[str, Any], directory: Path, render: Callable[[dict], str]) -> str:
    """Write ``<name>.json`` and the Markdown rendered from it (``<name>.md``), and return the Markdown.

    Results written to ``bench/results`` also replace the benchmark's section of the READMES.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = render(result)
    (directory / f"{name}.md").write_text(markdown + "\n")
    logger.info("wrote %s/%s.{json,md}", directory, name)
    publish(name, markdown, directory)
    return markdown


def fill_sections(text: str, rendered: dict[str, str]) -> str:
    """Replace the body of every ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->`` section found in ``rendered``."""

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in rendered:
            return match.group(0)
        return f"<!-- bench:{name} -->\n{rendered[name]}\n<!-- /bench:{name} -->"

    return re.sub(r"<!-- bench:(\w+) -->.*?<!-- /bench:\1 -->", replace, text, flags=re.DOTALL)


def fill_readme(readme: Path, rendered: dict[str, str]) -> None:
    """Replace the sections of ``readme`` found in ``rendered``, writing the file only when it changes."""
    text = readme.read_text()
    updated = fill_sections(text, rendered)
    if updated != text:
        readme.write_text(updated)
        logger.info("updated the %s sections of %s", ", ".join(sorted(rendered)), readme)


def publish(name: str, markdown: str, directory: Path) -> None:
    """Put a benchmark's Markdown into the READMES, when the results went to the committed folder."""
    if directory.resolve() != RESULTS_DIR.resolve():
        return
    for readme in READMES:
        if readme.is_file():
            fill_readme(readme, {name: markdown})


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """Render rows as a Markdown table; ``align`` has one ``l`` or ``r`` per column (default: first left)."""
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"align {align!r} has {len(align)} entries for {len(headers)} columns")
    separator = ["---:" if side == "r" else ":---" for side in align]
    lines = ["| " + " | ".join(map(str, headers)) + " |", "| " + " | ".join(separator) + " |"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def round_order(items: Sequence[Any], round_index: int) -> list[Any]:
    """Return the order to measure ``items`` in during one round: forwards on even rounds, backwards on odd.

    Alternating the direction (A B C, C B A, ...) gives every item the same average
    position in time, so a slow drift of the machine's speed biases none of them.
    """
    return list(items) if round_index % 2 == 0 else list(reversed(items))


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return statistics.median(values)


def display_path(path: Path) -> str:
    """Return ``path`` relative to the repository root when it lies inside it, so results name no local folders."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def fmt(value: float | None, digits: int = 3) -> str:
    """Format a number for a table, or ``-`` for a missing one."""
    return "-" if value is None else f"{value:.{digits}f}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(arguments: list[str]) -> str | None:
    try:
        completed = subprocess.run(
            ["git", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip()
