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


def run_of(index: torch.Tensor) -> tuple[int, int] | None:
    """(start, length) when ``index`` is a run of consecutive integers, else None."""
    if index.numel() == 0 or index.is_meta:  # meta: built by a loader, found once loaded
        return None
    start = int(index[0])
    if torch.equal(index.cpu(), torch.arange(start, start + index.numel(), dtype=index.dtype)):
        return start, index.numel()
    return None
