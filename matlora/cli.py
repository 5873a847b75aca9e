"""The ``matlora`` command: one subcommand per job, each defined beside the code it runs.

Each package registers its subcommands with a ``register(subparsers)`` function whose
handlers import torch and the model code only when called, so ``matlora ask`` and
``--help`` start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from clients.cli import register as register_clients
    from server.cli import register as register_server
    from trainer.cli import register as register_trainer

    parser = argparse.ArgumentParser(
        prog="matlora",
        description="Train hierarchical (Matryoshka) LoRA adapters and serve them at any rank.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level for this run (default: INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_trainer(subparsers)
    register_server(subparsers)
    register_clients(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args) or 0)
    except (FileNotFoundError, ValueError) as error:
        # Bad input (a missing file, an invalid config or flag value): one clear line, no
        # traceback, unless --log-level DEBUG asks for it.
        logging.getLogger("matlora").debug("error details", exc_info=True)
        parser.exit(2, f"matlora {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
