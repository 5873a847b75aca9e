"""Subcommands of the inference server (placeholder until the server lands)."""


def register(subparsers) -> None:
    pass
