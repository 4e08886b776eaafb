"""Kinds that move or read channels without computing them (analysis and code generation).

- ``shape``: ``x.ndim``, ``x.shape``, ``x.size(d)``, ``x.dim()``, ``x.dtype``, ``x.device``
  read no channel value: they demand no channel and never make trimming put the constants
  back. The trimmed tensor answers them itself, except for the size of the channel axis,
  which is the original one (a constant), so that the code reading it computes as before.
- ``chanpad``: ``F.pad`` over the channel axis adds channels of the pad value: constants at
  known positions (the CIFAR ResNets' option-A shortcut). Nothing is computed: the layout
  shifts, and a spatial part of the pad still runs on the channels present.
- ``select``: ``x[:, a:b]`` and the parts of ``torch.split``/``chunk`` along the channels
  (``split`` itself computes nothing when only ``getitem`` reads it): a channel range; the
  channels present in it are one ``narrow`` where they are stored in a run, else a gather.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from velcro.trim import _ops as ops
from velcro.trim._modules import ChannelSelect
from velcro.trim._state import PAD, ChannelState, Physical, fresh, run_on

# -- analysis ---------------------------------------------------------------------------------


def split_is_read_by_parts(node: fx.Node) -> bool:
    """Only ``getitem`` with a literal index reads the parts of this split."""
    return bool(node.users) and all(
        user.op == "call_function" and user.target is operator.getitem
        and isinstance(user.args[1], int) for user in node.users)


def part_range(node: fx.Node, values: dict[fx.Node, object]) -> tuple[int, int] | None:
    """``getitem(split(x, ..., dim=1), i)``: the channel range of part i."""
    split = node.args[0]
    parts = values.get(split)
    if not isinstance(parts, (tuple, list)) or not isinstance(node.args[1], int):
        return None
    index = node.args[1] % len(parts)
    start = sum(int(p.shape[1]) for p in parts[:index])
    return start, start + int(parts[index].shape[1])


def forward_chanpad(gm: fx.GraphModule, node: fx.Node, values: dict[fx.Node, object],
                    states: dict[fx.Node, ChannelState]) -> tuple[int, int]:
    """State of a channel pad; returns (channels before, channels after)."""
    source = ops.tensor_arg(node)
    known, value = states[source], values[node]
    pad = ops.pad_amounts(node)
    ndim = value.dim()
    before, after = pad[2 * (ndim - 2)], pad[2 * (ndim - 2) + 1]
    state = fresh(value, 1)
    state.const = torch.cat([torch.ones(before, dtype=torch.bool), known.const,
                             torch.ones(after, dtype=torch.bool)])
    state.value = run_on(gm, node, {source: known.value})
    states[node] = state
    return before, after


def forward_select(source: fx.Node, start: int, stop: int, value: torch.Tensor,
                   states: dict[fx.Node, ChannelState], node: fx.Node) -> None:
    known = states[source]
    state = fresh(value, 1)
    state.const = known.const[start:stop].clone()
    state.value = known.value[:, start:stop].clone()
    states[node] = state


# -- code generation --------------------------------------------------------------------------


def emit_shape(writer, node: fx.Node) -> None:  # noqa: ANN001  (a GraphWriter)
    """A shape read of a (possibly trimmed) tensor, answered as the original tensor would."""
    source = node.args[0]
    if source not in writer.phys:
        writer.env[node] = writer._copy(node)
        return
    state = writer.a.states[source]
    phys = writer.phys[source]
    holder = phys.node if phys.node is not None else writer.materialize(source)
    value = writer.a.values[source]
    graph = writer.graph

    def size(dim: int) -> object:
        if dim % value.dim() == state.axis:
            return state.channels  # the original count: the trimmed one differs
        return graph.call_method("size", (holder, dim))

    if node.op == "call_function":  # getattr(x, name)
        name = node.args[1]
        if name == "shape":
            writer.env[node] = tuple(size(d) for d in range(value.dim()))
        else:
            writer.env[node] = graph.call_function(getattr, (holder, name))
        return
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if node.target == "size" and dim is None:
        writer.env[node] = tuple(size(d) for d in range(value.dim()))
    elif node.target == "size":
        writer.env[node] = size(dim)
    else:
        writer.env[node] = graph.call_method(node.target, (holder,))


def emit_chanpad(writer, node: fx.Node, before: int) -> None:  # noqa: ANN001
    source = ops.tensor_arg(node)
    in_phys = writer.physical(source, 1)
    layout = torch.where(in_phys.layout >= 0, in_phys.layout + before, PAD)
    if in_phys.node is None:
        writer._record(node, Physical(None, layout))
        return
    pad = ops.pad_amounts(node)
    ndim = writer.a.values[node].dim()
    spatial = pad[:2 * (ndim - 2)]
    new = in_phys.node
    if any(spatial):
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        new = writer.graph.call_function(F.pad, (new, spatial), {"value": value})
        writer.fresh.add(new)
    writer._record(node, Physical(new, layout))


def emit_select(writer, node: fx.Node, source: fx.Node, start: int,  # noqa: ANN001
                stop: int) -> None:
    in_phys = writer.physical(source, 1)
    layout = in_phys.layout
    inside = (layout >= start) & (layout < stop)
    where = inside.nonzero().flatten()
    new_layout = layout[where] - start
    if in_phys.node is None or where.numel() == 0:
        writer._record(node, Physical(None, new_layout))
        return
    first, count = int(where[0]), where.numel()
    if count == layout.numel():
        new = in_phys.node
    elif torch.equal(where, torch.arange(first, first + count)):
        new = writer.graph.call_method("narrow", (in_phys.node, 1, first, count))
    else:
        new = writer._helper("select", ChannelSelect(where, 1), (in_phys.node,))
    writer._record(node, Physical(new, new_layout))
