"""Subcommands of the clients (placeholder until the server lands)."""


def register(subparsers) -> None:
    pass
