"""Process-wide settings a library call must leave as it found them.

numba's parallel kernels run on OpenMP; the first launch sets OpenMP's thread count to
numba's, which is also the count torch reads back: after ``torch.set_num_threads(1)``,
calibrating once left torch at two threads. Every numba launch runs inside
:func:`torch_threads_kept`. Building modules draws their initial weights from torch's global
generator; functions that build modules for the caller (``trim``, ``load_trimmed``) are
wrapped in :func:`rng_kept`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore torch's intra-op thread count after the block if something changed it.

    Example:
        >>> with torch_threads_kept():
        ...     numba_kernel(...)
    """
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def rng_kept(function: Callable[P, R]) -> Callable[P, R]:
    """Decorator: whatever ``function`` draws from torch's global CPU generator (building
    modules initialises their weights from it) leaves the caller's random stream as it was.

    Example:
        >>> @rng_kept
        ... def build():
        ...     return torch.nn.Conv2d(3, 8, 3)  # its random init no longer shifts the stream
    """

    @functools.wraps(function)
    def kept(*args: P.args, **kwargs: P.kwargs) -> R:
        with torch.random.fork_rng(devices=[]):
            return function(*args, **kwargs)

    return kept
