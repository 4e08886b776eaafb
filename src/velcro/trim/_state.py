"""What trimming knows of one tensor, and where its channels are stored (shared by the
analysis, the kinds it handles beside ``_analysis`` and the code generation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx


@dataclass
class ChannelState:
    """What trimming knows of one tensor: its channel axis and constant channels.

    Attributes:
        axis: channel axis of the batched tensor (1 for NCHW, the last for linear outputs).
        const: bool per channel, True where the channel is a batch-independent constant.
        value: one-image tensor (batch axis of size 1) holding the constants' values
            (other channels are zero).
    """

    axis: int
    const: torch.Tensor
    value: torch.Tensor

    @property
    def channels(self) -> int:
        return self.const.numel()

    def mask(self, channels: torch.Tensor) -> torch.Tensor:
        """``value`` with every channel outside ``channels`` (bool) set to zero."""
        view = [1] * self.value.dim()
        view[self.axis] = self.channels
        return self.value * channels.view(view).to(self.value.dtype)


# A layout position that holds no channel: padding that keeps channel counts at a multiple
# of ``channel_multiple`` (its value is meaningless; consumers give it zero weight).
PAD = -1


@dataclass
class Physical:
    """The new graph's tensor for one original tensor: ``node`` holds channels ``layout``.

    ``layout[i]`` is the channel id stored at position i, or ``PAD``.
    """

    node: fx.Node | None
    layout: torch.Tensor


def positions(layout: torch.Tensor, channels: int) -> torch.Tensor:
    """channel id -> position in ``layout`` (-1 where absent)."""
    where = torch.full((channels,), -1, dtype=torch.int64)
    valid = layout >= 0
    where[layout[valid]] = torch.arange(layout.numel())[valid]
    return where


def expand(layout: torch.Tensor, multiple: int) -> torch.Tensor:
    """The layout after each channel becomes ``multiple`` consecutive ones (padding stays)."""
    expanded = layout[:, None] * multiple + torch.arange(multiple)
    expanded[layout < 0] = PAD
    return expanded.flatten()


def fresh(value: torch.Tensor, axis: int) -> ChannelState:
    channels = value.shape[axis]
    return ChannelState(axis, torch.zeros(channels, dtype=torch.bool), torch.zeros_like(value))


def run_on(gm: fx.GraphModule, node: fx.Node, env: dict[fx.Node, object]) -> torch.Tensor:
    """Run ``node``'s operation with its inputs taken from ``env`` (clones: ops may be in-place)."""
    def fetch(n: fx.Node) -> object:
        value = env[n]
        return value.clone() if isinstance(value, torch.Tensor) else value

    args = fx.node.map_arg(node.args, fetch)
    kwargs = fx.node.map_arg(node.kwargs, fetch)
    with torch.no_grad():
        if node.op == "call_module":
            return gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)


def as_state(node: fx.Node, axis: int, values: dict[fx.Node, object],
              states: dict[fx.Node, ChannelState]) -> ChannelState:
    """The state of a tensor operand; one trimming knows nothing of has no constants."""
    return states[node] if node in states else fresh(values[node], axis)
