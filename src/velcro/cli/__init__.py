"""The `velcro` command: thin, it parses arguments and calls the API.

Each subcommand lives in ``velcro/cli/_<name>.py`` with two functions:
``add_parser(subparsers)`` (which must call ``parser.set_defaults(run=run)``) and
``run(args) -> int``. User errors are raised as VelcroError and printed here as one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from velcro import __version__
from velcro.distributed import process_group
from velcro.errors import VelcroError

COMMANDS = [
    "calibrate", "compress", "evaluate", "export", "inspect",
    "search", "sweep", "report", "demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="velcro",
        description="Value-locality compression of pretrained CNNs for specialized tasks.",
    )
    parser.add_argument("--version", action="version", version=f"velcro {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"velcro.cli._{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"velcro.cli._{name}":
                continue  # not built yet
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `velcro` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # Under torchrun: join the group now, so that --device cuda means this rank's GPU.
        process_group()
        return int(args.run(args) or 0)
    except VelcroError as exc:
        print(f"velcro {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("velcro: interrupted", file=sys.stderr)
        return 130

