"""The `velcro` command: thin, it parses arguments and calls the API.

Each subcommand lives in ``velcro/cli/_<name>.py`` with two functions:
``add_parser(subparsers)`` (which must call ``parser.set_defaults(run=run)``) and
``run(args) -> int``; a subcommand that reads or writes files also sets
``preflight(args) -> Files`` (see ``velcro.cli._files``), checked before ``run``.

Every user error is one line on stderr and exit code 2, before any work where it can be:
usage errors, option values (``velcro.cli._values``), outputs that would destroy inputs
(``velcro.cli._files``), VelcroError from the API, and a full disk. A closed stdout
(``velcro inspect X | head``) ends the command quietly, with the status a shell reports for a
tool ended by SIGPIPE.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from velcro import __version__
from velcro.distributed import process_group
from velcro.errors import VelcroError

COMMANDS = [
    "calibrate", "compress", "evaluate", "export", "inspect",
    "search", "sweep", "report", "demo",
]
SIGPIPE_STATUS = 128 + 13  # what a shell reports for a process ended by SIGPIPE
_DISK_ERRORS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG, errno.EROFS}


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


def _one_line_usage_errors(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """argparse prints the usage and the error on two lines; velcro prints one."""

    def error(message: str):
        options = [a for a in argv if a.startswith("-") and a not in ("-h", "--help")]
        if "COMMAND" in message and options:
            message += f" (before it: {' '.join(options)})"
        parser.exit(2, f"velcro: error: {message}; see 'velcro --help'\n")

    parser.error = error  # the subcommands' parsers do the same (cli._common.new_parser)


def _stdout_gone() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file behind sys.stdout
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `velcro` command; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    _one_line_usage_errors(parser, argv)
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error, already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    if unknown:
        print(f"velcro {args.command}: error: unrecognized arguments: {' '.join(unknown)}; "
              f"see 'velcro {args.command} --help'", file=sys.stderr)
        return 2
    try:
        preflight = getattr(args, "preflight", None)
        if preflight is not None:  # outputs that are inputs, unwritable folders: before work
            from velcro.cli._files import check

            check(preflight(args))
        # Under torchrun: join the group now, so that --device cuda means this rank's GPU.
        process_group()
        code = int(args.run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except VelcroError as exc:
        print(f"velcro {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _stdout_gone()
        return SIGPIPE_STATUS
    except KeyboardInterrupt:
        print("velcro: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in _DISK_ERRORS:
            raise
        where = f" '{exc.filename}'" if exc.filename else ""
        print(f"velcro {args.command}: error: cannot write{where}: {exc.strerror}; free some "
              "space or choose another location", file=sys.stderr)
        return 2
