"""Code generation for residual additions (part of ``_build``).

``a + b`` where each side computes its own subset of the channels: the side that computes
every needed channel is the base; the other side's computed channels are added where they
belong (one slice addition when the producer's filters were ordered to line up), and its
constant channels are folded into the base producer's bias, so nothing is placed.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from velcro.trim import _ops as ops
from velcro.trim._analysis import Physical, positions
from velcro.trim._modules import (
    ChannelSelect,
    ChannelSum,
    Materialize,
    rebuild,
    split_uniform,
)
from velcro.trim._writer import GraphWriter


def emit_sum(builder: GraphWriter, node: fx.Node) -> None:
    """``a + b`` / ``a - b``: add what both compute, fold the rest into a bias."""
    a, b, sign = ops.sum_operands(node)
    state = builder.a.states[node]
    axis = state.axis
    layout = builder.in_stream_order(node, builder.a.needed[node].nonzero().flatten())
    if layout.numel() == 0:
        builder._record(node, Physical(None, layout))
        return
    operands = [(a, 1, builder.physical(a, axis), builder.state(a, axis)),
                (b, sign, builder.physical(b, axis), builder.state(b, axis))]
    covering = [op for op in operands if op[2].node is not None and bool(
        (positions(op[2].layout, state.channels)[layout] >= 0).all())]
    covering = [op for op in covering if op[1] > 0]
    if not covering:
        # each side in the needed layout (its missing needed channels are constants)
        parts = [_in_layout(builder, n, layout, axis) for n in (a, b)]
        new = builder.graph.call_function(torch.add if sign > 0 else torch.sub, tuple(parts))
        builder._record(node, Physical(new, layout))
        return
    base = covering[0]
    other = operands[1] if base is operands[0] else operands[0]
    base_node = base[2].node
    if int((base[2].layout >= 0).sum()) == layout.numel():
        layout = base[2].layout  # the same channels: keep the base's order, no copy
    else:
        base_where = positions(base[2].layout, state.channels)
        base_node = builder._helper("select", ChannelSelect(base_where[layout], axis),
                                    (base_node,))
    valid = layout >= 0
    constant = torch.zeros_like(state.value.index_select(axis, layout.clamp_min(0)))
    other_where = positions(other[2].layout, state.channels)[layout.clamp_min(0)]
    absent = (other_where < 0) & valid
    if bool(absent.any()):
        assert bool(other[3].const[layout[absent]].all()), f"{node.name}: channels lost"
        constant = constant + other[1] * other[3].mask(
            _mask_of(layout[absent], state.channels)).index_select(axis, layout.clamp_min(0))
        constant[(slice(None),) * axis + (~valid,)] = 0.0
    inputs = [base_node]
    sources, targets, signs = [], [], [1]
    if other[2].node is not None and bool(((other_where >= 0) & valid).any()):
        present = ((other_where >= 0) & valid).nonzero().flatten()
        source, target = _line_up(other_where[present], present, layout,
                                  other[2].layout.numel())
        sources.append(source)
        targets.append(target)
        signs.append(other[1])
        inputs.append(other[2].node)
    # the base may be added into when it is a fresh tensor nobody else reads
    sole_reader = base_node is not base[2].node or len(base[0].users) == 1
    inplace = base_node in builder.fresh and sole_reader
    if bool(constant.ne(0).any()) and not _fold_into_producer(builder, base_node, constant,
                                                              axis, sole_reader):
        inputs[0] = _add_constant(builder, inputs[0], constant, inplace)
        inplace = True
    if len(inputs) == 1:
        builder._record(node, Physical(inputs[0], layout))
        return
    module = ChannelSum(signs, sources, targets, axis, inplace)
    builder._record(node, Physical(builder._helper("sum", module, tuple(inputs)), layout))


def _in_layout(builder: GraphWriter, node: fx.Node, layout: torch.Tensor,
               axis: int) -> fx.Node:
    """``node``'s channels ``layout``, in that order: computed ones picked, constants placed.

    Channels outside ``layout`` may be missing without being constants (nobody needs them).
    """
    phys, state = builder.physical(node, axis), builder.state(node, axis)
    where = positions(phys.layout, state.channels)[layout]
    if phys.node is not None and torch.equal(phys.layout, layout):
        return phys.node
    missing = layout[where < 0]
    assert bool(state.const[missing].all()), f"{node.name}: channels lost"
    order = where.clone()
    order[where < 0] = phys.layout.numel() + torch.arange(missing.numel())
    constant = state.value.index_select(axis, missing)
    module = Materialize(constant, order, axis, computed=phys.node is not None)
    source = phys.node if phys.node is not None else builder.batch_source
    return builder._helper("materialize", module, (source,))


def _fold_into_producer(builder: GraphWriter, new_node: fx.Node, constant: torch.Tensor, axis: int,
                        single_use: bool) -> bool:
    """Add ``constant`` (one image, in the node's layout) to the producer's bias."""
    if new_node not in builder.producers or not single_use:
        return False
    target = builder.producers[new_node]
    module = builder.modules[target]
    uniform, remainder = split_uniform(constant.double(), axis)
    old_map = getattr(module, "bias_map", None)
    if remainder.numel() and old_map is not None:
        remainder = remainder + old_map.double()
    elif old_map is not None:
        remainder = old_map.double()
    bias = module.bias.detach().double() + uniform
    builder.modules[target] = rebuild(module, module.weight.detach(), bias, remainder)
    return True


def _add_constant(builder: GraphWriter, node: fx.Node, constant: torch.Tensor,
                  inplace: bool) -> fx.Node:
    builder.counter += 1
    target = builder._register(f"velcro.constant_{builder.counter}",
                               constant[0].float().contiguous())
    add = builder.graph.call_function(torch.Tensor.add_ if inplace else torch.add,
                                      (node, builder.graph.get_attr(target)))
    builder.fresh.add(add)
    return add


def _line_up(source: torch.Tensor, target: torch.Tensor, layout: torch.Tensor,
             count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where every channel added keeps its position, let the output's padding positions
    (nobody reads them) take whatever the other side holds there: the placement becomes
    one plain addition (one ``Add`` when exported, no slice or pad)."""
    span = min(layout.numel(), count)
    if not bool((source == target).all()) or int(target.max()) >= span:
        return source, target
    spare = torch.ones(span, dtype=torch.bool)
    spare[target] = False
    if bool((layout[:span][spare] < 0).all()):
        return torch.arange(span), torch.arange(span)
    return source, target


def _mask_of(channels: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[channels] = True
    return mask
