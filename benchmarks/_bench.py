"""What every benchmark shares (see benchmarks/README.md): ``--quick``, where its files go,
and a first line on stdout at once.

- ``--quick``: a short run (tiny sizes, few repeats) that proves the script works end to end
  in about a minute; ``make bench`` runs every bench this way. Its figures mean nothing.
- Files (plots, raw rows) go to ``runs/bench/<bench>/`` (untracked), or ``--out DIR``;
  ``--update-results`` writes them into ``benchmarks/`` instead, beside RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def add_options(parser: argparse.ArgumentParser) -> None:
    """``--quick``, ``--out DIR`` and ``--update-results``."""
    group = parser.add_argument_group("benchmark run")
    group.add_argument("--quick", action="store_true",
                       help="a short run that checks the script works (figures mean nothing)")
    group.add_argument("--out", type=Path, default=None, metavar="DIR",
                       help="folder for plots and raw rows (default runs/bench/<bench>/)")
    group.add_argument("--update-results", action="store_true",
                       help="write plots and raw rows into benchmarks/ (the tracked copies)")


def output_dir(args: argparse.Namespace, bench: str) -> Path:
    """Where this run writes its files (created)."""
    if args.update_results:
        folder = HERE
    elif args.out is not None:
        folder = args.out
    else:
        folder = ROOT / "runs" / "bench" / bench
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def quick(args: argparse.Namespace, **settings) -> None:
    """With ``--quick``, replace the given settings on ``args`` (the full run keeps its own)."""
    if args.quick:
        for name, value in settings.items():
            setattr(args, name, value)


def say(text: str) -> None:
    """A progress line, printed at once (stdout may be a pipe)."""
    print(text, flush=True)


def started(bench: str, args: argparse.Namespace, what: str) -> None:
    """The first line of every run: what it measures, and whether it is the quick one."""
    mode = ("--quick: a short check that the script works; its figures mean nothing"
            if args.quick else "full run")
    say(f"{bench}: {what} ({mode})")
    sys.stdout.flush()
