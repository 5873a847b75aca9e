"""Regenerate every benchmark's Markdown table from its JSON results, and the README sections that show them.

A README section between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` is replaced
by the Markdown of benchmark NAME, so the published tables always come from the JSON.

    python -m bench.render                        # bench/results -> bench/results/*.md, README.md, bench/README.md
    python -m bench.render --readme OTHER.md      # fill the sections of another file instead
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import common

BENCHMARKS = ("quality", "serving_cost", "mixed_batching", "training_cost", "serve_latency")
DEFAULT_READMES = common.READMES


def render_all(results_dir: Path) -> dict[str, str]:
    """Write ``<name>.md`` beside each ``<name>.json`` found and return the Markdown by benchmark name."""
    rendered = {}
    for name in BENCHMARKS:
        path = results_dir / f"{name}.json"
        if not path.is_file():
            continue
        render = importlib.import_module(f"bench.{name}").render_markdown
        markdown = render(json.loads(path.read_text()))
        (results_dir / f"{name}.md").write_text(markdown + "\n")
        rendered[name] = markdown
    return rendered


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=common.RESULTS_DIR, help="folder with the JSON results")
    parser.add_argument(
        "--readme",
        type=Path,
        action="append",
        default=None,
        help="a Markdown file whose bench sections to fill (repeatable; default: README.md and bench/README.md)",
    )
    args = parser.parse_args(argv)
    rendered = render_all(args.results_dir)
    for readme in args.readme or DEFAULT_READMES:
        common.fill_readme(readme, rendered)
    print(f"rendered {', '.join(rendered) or 'nothing'} from {args.results_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
