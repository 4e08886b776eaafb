"""The analysis behind ``trim``: which channels are constant, and which must be computed.

Two passes over the traced graph (kinds of node in ``_ops``):

1. forward, constant propagation: for every tensor with a known channel axis, which channels
   are batch-independent constants and their per-image values. Sites start it (the plan's
   channels); values are propagated by running each node's own operation on a one-image
   *probe* that holds the constants (exact for channelwise operations, which never mix
   channels);
2. backward, liveness: which channels something downstream reads as computed values. A
   filter nobody needs is removed; a constant is never computed.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from velcro.errors import VelcroError
from velcro.graph._plain import is_plain
from velcro.graph.layers import batchnorm_affine
from velcro.trim import _grouped
from velcro.trim import _ops as ops
from velcro.trim import _placement as placement
from velcro.trim._state import (  # noqa: F401  (re-exported for _build, _writer, _sum)
    PAD,
    ChannelState,
    Physical,
    as_state,
    expand,
    fresh,
    positions,
    run_on,
)


def fold_batchnorm(gm: fx.GraphModule) -> None:
    """Fold each eval-mode batch-norm into the convolution that alone feeds it (in place)."""
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not is_plain(modules[node.target],
                                                     ops.BATCHNORM_MODULES):
            continue
        source = ops.tensor_arg(node)
        # shape reads (timm's ``_assert(x.ndim == 4)``) read the same shape after folding
        if source is None or source.op != "call_module" or any(
                user is not node and not ops.is_shape_read(user) for user in source.users):
            continue
        conv, norm = modules[source.target], modules[node.target]
        if (not is_plain(conv, ops.CONV_MODULES) or calls[source.target] != 1
                or calls[node.target] != 1 or not norm.track_running_stats):
            continue
        fused = copy.copy(conv)  # shares nothing it keeps: weight and bias are replaced
        fused._parameters = dict(conv._parameters)
        scale, shift = batchnorm_affine(norm, torch.float64)
        bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(shift)
        view = [-1] + [1] * (conv.weight.dim() - 1)
        dtype = conv.weight.dtype
        fused.weight = nn.Parameter((conv.weight.detach().double() * scale.view(view)).to(dtype))
        fused.bias = nn.Parameter((bias * scale + shift).to(dtype))
        _set_module(gm, source.target, fused)
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, name, module)


class _Recorder(fx.Interpreter):
    """Runs the graph once and keeps every node's value (batch of one)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node) -> object:
        result = super().run_node(n)
        self.values[n] = result.detach().clone() if isinstance(result, torch.Tensor) else result
        return result


@torch.no_grad()
def record(gm: fx.GraphModule, example: torch.Tensor) -> dict[fx.Node, object]:
    """Every node's value on ``example`` (one image)."""
    recorder = _Recorder(gm)
    recorder.run(example)
    return recorder.values


@dataclass
class Analysis:
    """The result of both passes.

    Attributes:
        kinds: node -> kind (``_ops``).
        states: node -> :class:`ChannelState`, for tensors with a known channel axis.
        needed: node -> bool per channel: computed values something downstream reads.
        site_units: site node -> the plan's constant channels there.
        values: node -> its value on the probe image (shapes, sizes).
        ranges: ``select``/``chanpad`` node -> (source, start, stop) / (source, before,
            after): where its channels come from.
        demands: node -> [(consumer, channels)]: who needs which of its channels (why a
            filter stays, for the trim report).
    """

    kinds: dict[fx.Node, str]
    states: dict[fx.Node, ChannelState]
    needed: dict[fx.Node, torch.Tensor]
    site_units: dict[fx.Node, torch.Tensor]
    values: dict[fx.Node, object]
    ranges: dict[fx.Node, tuple[fx.Node, int, int]] = field(default_factory=dict)
    demands: dict[fx.Node, list] = field(default_factory=dict)


def _axis_of(site_channel_axis: int, ndim: int) -> int:
    return site_channel_axis + 1 if site_channel_axis >= 0 else ndim + site_channel_axis


def analyse(gm: fx.GraphModule, values: dict[fx.Node, object],
            site_plans: dict[fx.Node, tuple[torch.Tensor, torch.Tensor, int]]) -> Analysis:
    """Both passes. ``site_plans``: site node -> (units, constant, plan channel axis)."""
    kinds: dict[fx.Node, str] = {}
    states: dict[fx.Node, ChannelState] = {}
    ranges: dict[fx.Node, tuple[fx.Node, int, int]] = {}
    for node in gm.graph.nodes:
        kinds[node] = _forward(gm, node, values, states, kinds, ranges)
        if node in site_plans:
            if node not in states:
                # fed by something trim cannot see through (a grouped or functional conv):
                # the site is still trimmed here, its input computed in full
                source = ops.tensor_arg(node)
                if source is None or not isinstance(values[node], torch.Tensor):
                    raise VelcroError(
                        f"site '{node.name}' reads more than one tensor; trim cannot replace "
                        "its channels (make the activation a single-input call)"
                    )
                axis = _axis_of(site_plans[node][2], values[node].dim())
                states[node] = fresh(values[node], axis)
                kinds[node] = "channelwise"
            _overlay_plan(node, states, site_plans[node], values)
    demands: dict[fx.Node, list] = {}
    needed = _liveness(gm, kinds, states, values, ranges, demands)
    units = {node: plan[0] for node, plan in site_plans.items()}
    return Analysis(kinds, states, needed, units, values, ranges, demands)


def _overlay_plan(node: fx.Node, states: dict[fx.Node, ChannelState],
                  site_plan: tuple[torch.Tensor, torch.Tensor, int],
                  values: dict[fx.Node, object]) -> None:
    units, constant, plan_axis = site_plan
    state = states[node]
    value = values[node]
    axis = _axis_of(plan_axis, value.dim())
    if axis != state.axis or tuple(constant.shape) != tuple(value.shape[1:]):
        raise VelcroError(
            f"the plan's site at node '{node.name}' has shape {tuple(constant.shape)} but the "
            f"model computes {tuple(value.shape[1:])} there; trim with the input size the "
            "statistics were collected at (input_shape=...)"
        )
    chosen = torch.zeros(state.channels, dtype=torch.bool)
    chosen[units] = True
    view = [1] * value.dim()
    view[axis] = state.channels
    keep = chosen.view(view)
    state.value = torch.where(keep, constant.unsqueeze(0).to(state.value.dtype), state.value)
    state.const = state.const | chosen


def _forward(gm: fx.GraphModule, node: fx.Node, values: dict[fx.Node, object],
             states: dict[fx.Node, ChannelState], kinds: dict[fx.Node, str],
             ranges: dict[fx.Node, tuple[fx.Node, int, int]]) -> str:
    value = values.get(node)
    source = ops.tensor_arg(node)
    source_state = states.get(source) if source is not None else None
    ndim = values[source].dim() if source_state is not None else None
    if (node.op == "call_function" and node.target is operator.getitem
            and kinds.get(source) == "split"):
        return _forward_part(node, source, values, states, ranges)
    kind = ops.classify(gm, node, source_state.axis if source_state else None, ndim)
    if kind == "split":
        return "split" if (ops.split_dim(node) % ndim == source_state.axis == 1
                           and placement.split_is_read_by_parts(node)) else "opaque"
    if kind == "shape":
        return kind
    if node.op in ("placeholder", "get_attr", "output") or not isinstance(value, torch.Tensor):
        return "opaque" if kind != "batch_size" else kind
    if kind == "producer":
        axis = 1 if isinstance(gm.get_submodule(node.target), ops.CONV_MODULES) else value.dim() - 1
        state = fresh(value, axis)
        if source_state is not None and bool(source_state.const.all()):
            state.const[:] = True  # every input channel constant: so is every output
            state.value = run_on(gm, node, {source: source_state.value})
        elif source is not None:
            _zero_filters(gm, node, source, values, state)
        states[node] = state
    elif kind == "channelwise":
        state = fresh(value, source_state.axis)
        multiple = state.channels // source_state.channels
        state.const = source_state.const.repeat_interleave(multiple)
        if state.const.any():
            state.value = run_on(gm, node, {source: source_state.value})
        states[node] = state
    elif kind == "grouped":
        _grouped.forward(gm, node, values, states)
    elif kind == "chanpad":
        before, after = placement.forward_chanpad(gm, node, values, states)
        ranges[node] = (source, before, after)
    elif kind == "select":
        start, stop, _ = slice(*ops.channel_range(node, 1)).indices(source_state.channels)
        placement.forward_select(source, start, stop, value, states, node)
        ranges[node] = (source, start, stop)
    elif kind == "sum":
        kind = _forward_sum(gm, node, values, states, value)
    elif kind == "cat":
        kind = _forward_cat(node, values, states, value)
    elif kind == "flatten":
        spatial = values[source][0, 0].numel()
        state = fresh(value, value.dim() - 1)
        state.const = source_state.const.repeat_interleave(spatial)
        state.value = source_state.value.reshape(value.shape)
        states[node] = state
    return kind


def _forward_part(node: fx.Node, split: fx.Node, values: dict[fx.Node, object],
                  states: dict[fx.Node, ChannelState],
                  ranges: dict[fx.Node, tuple[fx.Node, int, int]]) -> str:
    """``getitem(split(x, ..., dim=1), i)``: a channel range of x."""
    span = placement.part_range(node, values)
    if span is None or not isinstance(values.get(node), torch.Tensor):
        return "opaque"
    source = ops.tensor_arg(split)
    placement.forward_select(source, span[0], span[1], values[node], states, node)
    ranges[node] = (source, span[0], span[1])
    return "select"


def _zero_filters(gm: fx.GraphModule, node: fx.Node, source: fx.Node,
                  values: dict[fx.Node, object], state: ChannelState) -> None:
    """A filter whose weights are all zero outputs its bias whatever it reads: a constant.

    (The explicit predictions of affine plans are such convolutions: see ``_affine``.)
    """
    weight = gm.get_submodule(node.target).weight.detach()
    zero = ~weight.flatten(1).ne(0).any(dim=1)
    if not bool(zero.any()) or not isinstance(values.get(source), torch.Tensor):
        return
    output = run_on(gm, node, {source: torch.zeros_like(values[source])})
    view = [1] * output.dim()
    view[state.axis] = -1
    state.const = zero
    state.value = output * zero.view(view).to(output.dtype)


def _forward_sum(gm: fx.GraphModule, node: fx.Node, values: dict[fx.Node, object],
                 states: dict[fx.Node, ChannelState], value: torch.Tensor) -> str:
    a, b, _ = ops.sum_operands(node)
    known = [n for n in (a, b) if n in states]
    if not known:
        return "opaque"
    axis = states[known[0]].axis
    if any(not isinstance(values[n], torch.Tensor) or values[n].shape != value.shape
           for n in (a, b)) or any(states[n].axis != axis for n in known):
        return "opaque"  # broadcasting or mismatched axes: computed on full tensors
    sa, sb = as_state(a, axis, values, states), as_state(b, axis, values, states)
    state = fresh(value, axis)
    state.const = sa.const & sb.const
    if state.const.any():
        state.value = run_on(gm, node, {a: sa.value, b: sb.value})
    states[node] = state
    return "sum"


def _forward_cat(node: fx.Node, values: dict[fx.Node, object],
                 states: dict[fx.Node, ChannelState], value: torch.Tensor) -> str:
    inputs, dim = ops.cat_inputs(node)
    known = [n for n in inputs if isinstance(n, fx.Node) and n in states]
    if not known or not all(isinstance(n, fx.Node) for n in inputs):
        return "opaque"
    axis = states[known[0]].axis
    if dim % value.dim() != axis or any(states[n].axis != axis for n in known):
        return "opaque"
    parts = [as_state(n, axis, values, states) for n in inputs]
    state = fresh(value, axis)
    state.const = torch.cat([p.const for p in parts])
    state.value = torch.cat([p.value for p in parts], axis)
    states[node] = state
    return "cat"


def _liveness(gm: fx.GraphModule, kinds: dict[fx.Node, str],
              states: dict[fx.Node, ChannelState], values: dict[fx.Node, object],
              ranges: dict[fx.Node, tuple[fx.Node, int, int]],
              demands: dict[fx.Node, list]) -> dict[fx.Node, torch.Tensor]:
    needed = {node: torch.zeros(state.channels, dtype=torch.bool)
              for node, state in states.items()}

    def demand(source: fx.Node, channels: torch.Tensor, by: fx.Node) -> None:
        if source in needed:
            wanted = channels & ~states[source].const
            needed[source] |= wanted
            if bool(wanted.any()):
                demands.setdefault(source, []).append((by, wanted))

    def everything(source: fx.Node) -> torch.Tensor:
        return torch.ones_like(needed[source])

    for node in reversed(gm.graph.nodes):
        kind = kinds[node]
        source = ops.tensor_arg(node)
        if kind == "producer" and node.args and source in states:
            demand(source, everything(source), node)
        elif kind == "channelwise":
            if source in needed:
                multiple = states[node].channels // states[source].channels
                wanted = needed[node].view(-1, multiple).any(dim=1)
                demand(source, wanted, node)
        elif kind == "grouped":
            module = gm.get_submodule(node.target)
            demand(source, _grouped.demanded(module, needed[node], states[source].channels),
                   node)
        elif kind in ("select", "chanpad"):
            origin, start, stop = ranges[node]
            wanted = torch.zeros(states[origin].channels, dtype=torch.bool)
            if kind == "select":
                wanted[start:stop] = needed[node]
            else:
                wanted = needed[node][start:start + wanted.numel()]
            demand(origin, wanted, node)
        elif kind == "sum":
            a, b, _ = ops.sum_operands(node)
            demand(a, needed[node], node)
            demand(b, needed[node], node)
        elif kind == "cat":
            offset = 0
            for part in ops.cat_inputs(node)[0]:
                size = values[part].shape[states[node].axis]
                demand(part, needed[node][offset:offset + size], node)
                offset += size
        elif kind == "flatten":
            demand(source, needed[node].view(states[source].channels, -1).any(dim=1), node)
        elif kind in ("batch_size", "shape", "split"):
            continue
        else:  # opaque and output: everything, constants placed
            for each in node.all_input_nodes:
                if each in needed:
                    demand(each, everything(each), node)
    return needed
