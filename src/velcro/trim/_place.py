"""Static channel placement: the forms the trimming helpers take when exported.

A trimmed model moves channels between layouts (a residual sum adds one side's channels
where they belong in the other's; a :class:`~velcro.trim._modules.Materialize` puts the
computed channels back among the constants). Each such move is known when the model is
trimmed, so it is written with constant positions only, in the cheapest of these forms
(ONNX nodes in brackets):

- nothing moves: the tensor itself [none];
- one contiguous run of channels to one contiguous run: a pad, negative where it crops
  [``Pad``], or a slice then a pad [``Slice``, ``Pad``];
- every position filled from anywhere: a gather with constant indices [``Gather``];
- a run of positions filled from anywhere: a gather then a pad [``Gather``, ``Pad``];
- anything else: a zero channel padded in front, then a gather [``Pad``, ``Gather``].

A residual sum exports its placements on channels-first maps as a 1x1 convolution with a
0/1 weight instead (:func:`place_by_conv`, one ``Conv``): onnxruntime keeps it, and the
addition it feeds, in its blocked channel layout, which the forms above leave.

No form reads a value to decide where something goes (no ``NonZero``, ``ScatterND`` or
``Where``), and none depends on the batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def exporting() -> bool:
    """True while ``torch.export`` (and so ``torch.onnx.export``) traces the model."""
    return bool(torch.compiler.is_exporting())


def pad_channels(x: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    """Zero channels before and after along ``dim`` (a negative count crops)."""
    if before == 0 and after == 0:
        return x
    dim = dim % x.dim()
    return F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [before, after])


def place(x: torch.Tensor, dim: int, where: list[int]) -> torch.Tensor:
    """A tensor whose channel ``o`` along ``dim`` is ``x``'s channel ``where[o]`` (zeros
    where it is -1), written with static operations only."""
    size, count = len(where), x.shape[dim]
    filled = [o for o, source in enumerate(where) if source >= 0]
    if not filled:  # nothing of x is placed (callers avoid it; kept exact anyway)
        return pad_channels(x.narrow(dim, 0, 0), dim, size, 0)
    first, n = filled[0], len(filled)
    is_run = filled[-1] - first == n - 1  # the filled positions are contiguous
    start = where[first]
    if is_run and where[first:first + n] == list(range(start, start + n)):
        crop_front, crop_back = start, count - start - n
        pad_front, pad_back = first, size - first - n
        if min(crop_front, pad_front) == 0 and min(crop_back, pad_back) == 0:
            return pad_channels(x, dim, pad_front - crop_front, pad_back - crop_back)
        return pad_channels(x.narrow(dim, start, n), dim, pad_front, pad_back)
    index = torch.tensor(where[first:first + n] if is_run else [s + 1 for s in where],
                         dtype=torch.int64, device=x.device)
    if is_run and n == size:
        return x.index_select(dim, index)
    if is_run:
        return pad_channels(x.index_select(dim, index), dim, first, size - first - n)
    return pad_channels(x, dim, 1, 0).index_select(dim, index)


def is_identity_placement(where: list[int], count: int) -> bool:
    """The placement moves nothing: channel o is x's channel o, every one of x's read."""
    return len(where) == count and where == list(range(count))


def place_by_conv(x: torch.Tensor, dim: int, where: list[int]) -> torch.Tensor:
    """:func:`place` as a 1x1 convolution with a 0/1 weight (one ``Conv`` when exported).

    Exact: each output channel is 1.0 times one input channel plus zeros. Where an exporter
    runs convolutions in a blocked channel layout (onnxruntime's NCHWc), this keeps the
    placement, and the residual addition it feeds, inside that layout, where a ``Slice``,
    ``Pad`` or ``Gather`` would take the tensor out of it and back. It costs
    ``len(where) * x.shape[dim]`` MACs per position.
    """
    def kernel(value: float) -> object:  # a 1x1(x1) kernel holding value
        for _ in range(x.dim() - 2):
            value = [value]
        return value

    ones = [[kernel(1.0 if source == column else 0.0) for column in range(x.shape[dim])]
            for source in where]
    # from a Python list of the final shape: an exporter stores one constant
    weight = torch.tensor(ones, dtype=x.dtype, device=x.device)
    conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
    return conv(x, weight)


def conv_placeable(x: torch.Tensor, dim: int) -> bool:
    """A channels-first batch of 1-3 spatial dimensions (what a convolution reads)."""
    return 3 <= x.dim() <= 5 and dim % x.dim() == 1


def run_of(index: torch.Tensor) -> tuple[int, int] | None:
    """(start, length) when ``index`` is a run of consecutive integers, else None."""
    if index.numel() == 0 or index.is_meta:  # meta: built by a loader, found once loaded
        return None
    start = int(index[0])
    if torch.equal(index.cpu(), torch.arange(start, start + index.numel(), dtype=index.dtype)):
        return start, index.numel()
    return None
