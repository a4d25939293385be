"""Implementations of the `scepsy` subcommands (cli.py parses arguments and dispatches here)."""
