"""Checked option values: argparse ``type=`` functions that refuse a bad number while the
command line is parsed, so that it is one line (exit code 2) before any work starts.

Each bound says what the value is for: a count of classes no classifier head reaches, an
image side no ImageNet-style model is evaluated at, more decoding workers than any machine
would use. A value beyond it is almost certainly a typo (``--crop 100000``), and would
otherwise allocate until the machine runs out of memory.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from velcro.data.folder import MAX_IMAGE_SIDE
from velcro.data.tasks import MAX_CLASSES

MAX_WORKERS = 64  # image-decoding processes
MAX_LEVELS = 1024  # search profile levels per site (1/1024 of a site is finer than needed)
MAX_REFINE_ROUNDS = 30  # the step halves each round: 2^-30 of a site is below one unit
MAX_SEED = 2**32 - 1  # what every generator involved (torch, NumPy) takes
MAX_INPUT_ELEMENTS = 3 * MAX_IMAGE_SIDE * MAX_IMAGE_SIDE  # one image at the largest side
__all__ = ["MAX_IMAGE_SIDE", "MAX_INPUT_ELEMENTS", "fraction", "integer"]


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number in ``[low, high]`` (no upper bound when ``high`` is None)."""
    wanted = f"from {low} to {high}" if high is not None else f"of at least {low}"

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"give a whole number {wanted}, got '{text}'")
        return value

    parse.__name__ = "integer"
    return parse


def fraction(low: float = 0.0, high: float = 1.0, *, open_low: bool = False,
             open_high: bool = False) -> Callable[[str], float]:
    """A finite number between ``low`` and ``high`` (each end open or closed)."""
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = (math.isfinite(value)
                  and (low < value if open_low else low <= value)
                  and (value < high if open_high else value <= high))
        if not inside:
            raise argparse.ArgumentTypeError(f"give a fraction in {interval}, got '{text}'")
        return value

    parse.__name__ = "fraction"
    return parse


POSITIVE = integer(1)
CLASS_COUNT = integer(1, MAX_CLASSES)
WORKERS = integer(0, MAX_WORKERS)
IMAGE_SIDE = integer(0, MAX_IMAGE_SIDE)  # 0 turns resizing or cropping off
SEED = integer(0, MAX_SEED)
LEVELS = integer(1, MAX_LEVELS)
REFINE_ROUNDS = integer(0, MAX_REFINE_ROUNDS)
