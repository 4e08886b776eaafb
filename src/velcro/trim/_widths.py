"""How many filters a trimmed convolution gets: its live count k, or k rounded up with zero
filters where that runs faster (``trim``'s ``channel_multiple``).

Three policies:

- an integer m: round k up to a multiple of m (never above the original count); 1 keeps k;
- ``"auto"``: where k is not a multiple of 8, run the convolution as it will run (same input
  channels, kernel, stride, padding, input size, device, dtype) with k and with round-up(k, 8)
  filters, in interleaved rounds, and take the rounded width only if its median time is at
  least ``MARGIN`` lower (it computes more MACs, so it must win measurably). Measurements are
  cached per process by (device, convolution, k);
- a dict of widths by trimmed module name (``small.velcro_channel_widths``): the widths an
  earlier trim chose, so that re-trimming rebuilds the same architecture.

Only ``groups == 1`` convolutions are rounded (as before ``"auto"``): grouped convolutions
keep their group layout (:mod:`velcro.trim._grouped`) and depthwise ones follow their input.
"""

from __future__ import annotations

import numbers
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from velcro.errors import VelcroError, VelcroWarning

ALIGNMENT = 8  # the width "auto" tries: what CPU and GPU kernels vectorise over
MARGIN = 0.05  # the rounded width must be this much faster (median) to be taken
ROUNDS = 7  # interleaved rounds per measurement (fewer where a convolution is slow)
SAMPLE_S = 0.002  # one timed sample repeats the call until it lasts about this long
BUDGET_S = 0.25  # at most about this long per (convolution, k) measured
MAX_WIDTH_NAME = 400


@dataclass(frozen=True)
class ConvSignature:
    """A convolution as it will run, but for its filter count (the cache key with k)."""

    device: str
    dtype: torch.dtype
    batch: int
    in_channels: int
    input_size: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    padding_mode: str


def time_convolutions(signature: ConvSignature, widths: tuple[int, ...]) -> list[float]:
    """Median seconds per call of the convolution with each of ``widths`` filters, timed
    in interleaved rounds (the order alternates each round, so drift hits both alike)."""
    device = torch.device(signature.device)
    dims = len(signature.kernel_size)
    conv_class = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    like = {"device": device, "dtype": signature.dtype}
    x = torch.randn(signature.batch, signature.in_channels, *signature.input_size, **like)
    convs = [conv_class(signature.in_channels, width, signature.kernel_size,
                        stride=signature.stride, padding=signature.padding,
                        dilation=signature.dilation, padding_mode=signature.padding_mode,
                        **like).eval() for width in widths]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(conv: nn.Module, calls: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            conv(x)
        sync()
        return (time.perf_counter() - start) / calls

    with torch.inference_mode():
        for conv in convs:  # warm-up: allocation, kernel selection
            timed(conv, 1)
        once = max(timed(convs[0], 1), 1e-7)
        calls = max(1, min(1000, round(SAMPLE_S / once)))
        per_round = once * calls * len(convs)
        # two rounds at least (one in each order); slow convolutions get no more
        rounds = max(2, min(ROUNDS, int(BUDGET_S / per_round)))
        samples: list[list[float]] = [[] for _ in widths]
        for round_index in range(rounds):
            order = range(len(convs)) if round_index % 2 == 0 else reversed(range(len(convs)))
            for i in order:
                samples[i].append(timed(convs[i], calls))
    return [statistics.median(s) for s in samples]


# The timer ``auto`` uses (tests put a fake in its place) and its per-process cache.
measure: Callable[[ConvSignature, tuple[int, ...]], list[float]] = time_convolutions
_measured: dict[tuple[ConvSignature, int, int], tuple[float, float]] = {}


def rounded_is_faster(signature: ConvSignature, count: int, rounded: int) -> bool:
    """Whether ``rounded`` filters run at least ``MARGIN`` faster than ``count`` (cached)."""
    key = (signature, count, rounded)
    if key not in _measured:
        try:
            exact_s, rounded_s = measure(signature, (count, rounded))
        except RuntimeError as exc:  # out of memory, say: the exact count is always right
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            warnings.warn(f"channel_multiple='auto' could not time a {signature.in_channels}-"
                          f"channel convolution on {signature.device} ({first[:120]}); it "
                          f"keeps its {count} filters", VelcroWarning, stacklevel=2)
            exact_s, rounded_s = 1.0, 1.0
        _measured[key] = (float(exact_s), float(rounded_s))
    exact_s, rounded_s = _measured[key]
    return rounded_s <= (1.0 - MARGIN) * exact_s


def check_policy(channel_multiple: object) -> int | str | dict[str, int]:
    """``trim``'s ``channel_multiple`` checked: a positive int, "auto", or a widths dict."""
    if isinstance(channel_multiple, str) and channel_multiple == "auto":
        return "auto"
    if isinstance(channel_multiple, numbers.Integral) and not isinstance(channel_multiple,
                                                                          bool):
        if channel_multiple < 1:
            raise VelcroError(f"channel_multiple must be a positive integer, 'auto' or a dict "
                              f"of widths, got {channel_multiple!r}")
        return int(channel_multiple)
    if isinstance(channel_multiple, Mapping):
        widths = {}
        for name, width in channel_multiple.items():
            if not isinstance(name, str) or not name or len(name) > MAX_WIDTH_NAME:
                raise VelcroError(f"channel_multiple: key {str(name)[:80]!r} is not a module "
                                  "name; pass the velcro_channel_widths of a trimmed model")
            if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
                raise VelcroError(f"channel_multiple[{name!r}] must be a positive filter "
                                  f"count, got {str(width)[:80]!r}")
            widths[name] = int(width)
        return widths
    raise VelcroError(f"channel_multiple must be a positive integer, 'auto' or a dict of "
                      f"widths (a trimmed model's velcro_channel_widths), got "
                      f"{str(channel_multiple)[:80]!r}")


class WidthChooser:
    """The filter count of each trimmed ``groups == 1`` convolution, by the policy; keeps
    what it chose (``chosen``, by trimmed module name) for ``velcro_channel_widths``."""

    def __init__(self, policy: int | str | dict[str, int], device: torch.device,
                 batch: int = 1) -> None:
        self.policy = policy
        self.device = device
        self.batch = batch
        self.chosen: dict[str, int] = {}

    def width(self, name: str, module: nn.Module, count: int, full: int, in_channels: int,
              input_size: tuple[int, ...], dtype: torch.dtype) -> int:
        """Filters for trimmed module ``name`` keeping ``count`` of ``full`` filters, its
        input having ``in_channels`` channels of ``input_size``."""
        if isinstance(self.policy, dict):
            width = self.policy.get(name)
            if width is None:
                raise VelcroError(
                    f"channel_multiple has no width for convolution '{name}', which keeps "
                    f"{count} of {full} filters under this plan; pass the "
                    "velcro_channel_widths of a model trimmed from this plan and weights")
            if not count <= width <= full:
                raise VelcroError(
                    f"channel_multiple[{name!r}] = {width}, but that convolution keeps {count} "
                    f"of {full} filters under this plan: give {count} to {full} (the "
                    "velcro_channel_widths of a model trimmed from this plan and weights)")
        elif self.policy == "auto":
            rounded = min(-(-count // ALIGNMENT) * ALIGNMENT, full)
            width = count
            if rounded != count:
                signature = ConvSignature(
                    str(self.device), dtype, self.batch, in_channels, tuple(input_size),
                    tuple(module.kernel_size), tuple(module.stride),
                    module.padding if isinstance(module.padding, str)
                    else tuple(module.padding),
                    tuple(module.dilation), module.padding_mode)
                width = rounded if rounded_is_faster(signature, count, rounded) else count
        else:
            width = min(-(-count // self.policy) * self.policy, full)
        self.chosen[name] = width
        return width

    def check_all_used(self) -> None:
        """A widths dict naming a module this trim does not round is refused."""
        if isinstance(self.policy, dict):
            unused = sorted(set(self.policy) - set(self.chosen))
            if unused:
                raise VelcroError(
                    f"channel_multiple names '{unused[0][:80]}', not a trimmed convolution of "
                    "this model under this plan; pass the velcro_channel_widths of a model "
                    "trimmed from this plan and weights")
