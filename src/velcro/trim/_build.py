"""Code generation for ``trim``: a new graph that computes only the needed channels.

Each tensor of the original graph becomes a *physical* tensor holding some of its channels
(``layout``: channel ids in the order they are stored); every channel left out is a constant
(:mod:`velcro.trim._analysis` guarantees it). Consumers adapt to the layout they are given:

- a convolution/linear keeps the weight columns of the channels present and folds the
  constant channels into its bias (a bias map where the contribution is position-dependent);
  its filters are the channels something downstream needs, in its residual stream's order
  (``_order``) or else lined up with the partner of the residual addition it feeds;
- channelwise operations run on the channels present (batch-norm and depthwise convolutions
  sliced); a site drops the channels the plan makes constant;
- additions add the channels both sides have (one slice addition where the layouts line
  up) and fold the other side's constants into the producer's bias;
- concatenations concatenate what is present; the layout records the offsets;
- anything else gets the full tensor (:class:`Materialize`), so it computes what it did.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from velcro.trim import _grouped
from velcro.trim import _ops as ops
from velcro.trim import _placement as placement
from velcro.trim._analysis import PAD, ChannelState, Physical, expand, positions
from velcro.trim._modules import (
    ChannelSelect,
    rebuild,
    slice_batchnorm,
    slice_depthwise,
    split_uniform,
)
from velcro.trim._order import stream_orders
from velcro.trim._sum import emit_sum
from velcro.trim._writer import GraphWriter


class Builder(GraphWriter):
    """Builds the trimmed graph from an :class:`Analysis` of the (batch-norm folded) graph."""

    # -- the pass ------------------------------------------------------------------------
    def build(self, class_name: str) -> fx.GraphModule:
        self.requests = _grouped.requests(self.gm, self.a)
        self.orders = stream_orders(self.gm, self.a)
        for node in self.gm.graph.nodes:
            kind = self.a.kinds[node]
            if node.op == "placeholder":
                self.env[node] = self._copy(node)
                self.batch_source = self.batch_source or self.env[node]
            elif node.op == "output":
                self.graph.output(self._map_args(node)[0][0])
            elif kind == "producer" and node in self.a.states:
                self._producer(node)
            elif kind == "channelwise" and node in self.a.states:
                self._channelwise(node)
            elif kind == "sum" and node in self.a.states:
                self._sum(node)
            elif kind == "cat" and node in self.a.states:
                self._cat(node)
            elif kind == "flatten" and node in self.a.states:
                self._flatten(node)
            elif kind == "batch_size":
                self._batch_size(node)
            elif kind in ("grouped", "chanpad", "select") and node in self.a.states:
                self._placed(node, kind)
            elif kind == "shape":
                placement.emit_shape(self, node)
            elif kind == "split":
                continue  # its parts are read through ``select``
            else:
                self.env[node] = self._copy(node)
        self.resolve_attributes()
        self.graph.lint()
        return fx.GraphModule(self.modules, self.graph, class_name)

    def _placed(self, node: fx.Node, kind: str) -> None:
        if kind == "grouped":
            _grouped.emit(self, node)
        elif kind == "chanpad":
            placement.emit_chanpad(self, node, self.a.ranges[node][1])
        else:
            placement.emit_select(self, node, *self.a.ranges[node])

    def _out_layout(self, node: fx.Node) -> torch.Tensor:
        """The filters a producer computes: those needed, lined up with a residual partner
        (or in the group order of the grouped convolution it feeds)."""
        if node in self.requests:
            return self.requests[node]
        needed = self.a.needed[node]
        layout = needed.nonzero().flatten()
        if node in self.orders:  # its residual stream's order (``_order``)
            return self.in_stream_order(node, layout)
        users = list(node.users)
        if len(users) == 1 and self.a.kinds[users[0]] == "sum" and users[0] in self.a.states:
            a, b, _ = ops.sum_operands(users[0])
            partner = b if a is node else a
            if partner in self.phys or partner in self.env:
                partner_layout = self.physical(partner, self.a.states[node].axis).layout
                partner_layout = partner_layout[partner_layout >= 0]
                shared = partner_layout[needed[partner_layout]]
                rest = layout[positions(partner_layout, needed.numel())[layout] < 0]
                layout = torch.cat([shared, rest])
        return layout

    def _padded(self, node: fx.Node, layout: torch.Tensor, target: str,
                in_phys: Physical) -> torch.Tensor:
        """``layout`` with zero filters (PAD) appended to the width ``channel_multiple``
        chooses; only trimmed ``groups == 1`` convolutions are padded."""
        module = self.gm.get_submodule(node.target)
        count, full = layout.numel(), self.a.needed[node].numel()
        if node in self.requests or not isinstance(module, ops.CONV_MODULES) or count == full:
            return layout
        value = self.a.values[ops.tensor_arg(node)]
        width = self.widths.width(target, module, count, full, in_phys.layout.numel(),
                                  tuple(value.shape[2:]), value.dtype)
        return torch.cat([layout, torch.full((width - count,), PAD)])

    def _producer(self, node: fx.Node) -> None:
        module = self.gm.get_submodule(node.target)
        state = self.a.states[node]
        layout = self._out_layout(node)
        if layout.numel() == 0:
            self._record(node, Physical(None, layout))
            return
        source = ops.tensor_arg(node)
        in_axis = 1 if isinstance(module, ops.CONV_MODULES) else self.a.values[source].dim() - 1
        if source in self.a.states and self.a.states[source].axis != in_axis:
            # it contracts another axis than the channels trimming follows (a linear layer
            # over a feature map's width): it gets the full tensor
            full = self.a.values[source].shape[in_axis]
            in_state = ChannelState(in_axis, torch.zeros(full, dtype=torch.bool),
                                    torch.zeros_like(self.a.values[source]))
            in_phys = Physical(self.materialize(source), torch.arange(full))
        else:
            in_state = self.state(source, in_axis)
            in_phys = self.physical(source, in_axis)
        assert in_phys.node is not None, f"{node.name} has no computed input"
        target = self._register(node.target, object())  # its name, before its width
        layout = self._padded(node, layout, target, in_phys)
        in_layout = in_phys.layout
        folded = in_state.const.clone()
        folded[in_layout[in_layout >= 0]] = False
        weight = module.weight.detach()
        new_weight = weight.index_select(0, layout.clamp_min(0)).index_select(
            1, in_layout.clamp_min(0))
        new_weight[layout < 0] = 0.0
        new_weight[:, in_layout < 0] = 0.0
        bias = (module.bias.detach().double().index_select(0, layout.clamp_min(0))
                if module.bias is not None else torch.zeros(layout.numel(), dtype=torch.float64))
        bias[layout < 0] = 0.0
        bias_map = torch.empty(0)
        if bool(folded.any()):
            probe = in_state.mask(folded)
            with torch.no_grad():
                if isinstance(module, ops.CONV_MODULES):
                    contribution = module._conv_forward(probe, weight, None)
                else:
                    contribution = nn.functional.linear(probe, weight)
            contribution = contribution.double().index_select(state.axis, layout.clamp_min(0))
            contribution[(slice(None),) * state.axis + (layout < 0,)] = 0.0
            uniform, bias_map = split_uniform(contribution, state.axis)
            bias = bias + uniform
        new = rebuild(module, new_weight, bias, bias_map)
        self.modules[target] = new
        new_node = self.graph.call_module(target, (in_phys.node,))
        self.producers[new_node] = target
        self.fresh.add(new_node)
        self._record(node, Physical(new_node, layout))

    def _channelwise(self, node: fx.Node) -> None:
        source = ops.tensor_arg(node)
        state = self.a.states[node]
        in_phys = self.physical(source, state.axis)
        multiple = state.channels // self.state(source, state.axis).channels
        layout = expand(in_phys.layout, multiple)
        if in_phys.node is None:
            self._record(node, Physical(None, layout))
            return
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            if isinstance(module, ops.BATCHNORM_MODULES):
                module = slice_batchnorm(module, in_phys.layout)
            elif ops.is_depthwise(module):
                in_phys, layout = self._depthwise_inputs(node, in_phys, layout, multiple)
                if in_phys.node is None:
                    self._record(node, Physical(None, layout))
                    return
                module = slice_depthwise(module, in_phys.layout, layout)
            target = self._register(node.target, module)
            new = self.graph.call_module(target, (in_phys.node,))
        else:
            new = self._copy(node, {source: in_phys.node})
        if node in self.a.site_units:
            junk = torch.zeros(state.channels + 1, dtype=torch.bool)  # [-1]: padding, kept
            junk[self.a.site_units[node]] = True
            keep = (~junk[layout]).nonzero().flatten()
            if keep.numel() < layout.numel():
                layout = layout[keep]
                new = self._helper("select", ChannelSelect(keep, state.axis), (new,))
                if layout.numel() == 0:
                    new = None
        self._record(node, Physical(new, layout))

    def _depthwise_inputs(self, node: fx.Node, in_phys: Physical, layout: torch.Tensor,
                          multiple: int) -> tuple[Physical, torch.Tensor]:
        """A depthwise convolution computes only the filters something needs: its input
        is narrowed first where it carries channels read by others only (GhostNet)."""
        if multiple != 1:
            return in_phys, layout
        keep = (layout >= 0) & self.a.needed[node][layout.clamp_min(0)]
        if bool(keep.all()):
            return in_phys, layout
        where = keep.nonzero().flatten()
        if where.numel() == 0:
            return Physical(None, layout[where]), layout[where]
        first = int(where[0])
        if torch.equal(where, torch.arange(first, first + where.numel())):
            narrowed = self.graph.call_method("narrow", (in_phys.node, 1, first, where.numel()))
        else:
            narrowed = self._helper("select", ChannelSelect(where, 1), (in_phys.node,))
        return Physical(narrowed, in_phys.layout[where]), layout[where]

    def _sum(self, node: fx.Node) -> None:
        emit_sum(self, node)

    def _cat(self, node: fx.Node) -> None:
        inputs, _ = ops.cat_inputs(node)
        state = self.a.states[node]
        nodes, layouts, offset = [], [], 0
        for part in inputs:
            phys = self.physical(part, state.axis)
            if phys.node is not None:
                nodes.append(phys.node)
                layouts.append(torch.where(phys.layout >= 0, phys.layout + offset, PAD))
            offset += self.a.values[part].shape[state.axis]
        layout = torch.cat(layouts) if layouts else torch.zeros(0, dtype=torch.int64)
        new = self.graph.call_function(torch.cat, (nodes, state.axis)) if nodes else None
        if new is not None:
            self.fresh.add(new)
        self._record(node, Physical(new, layout))

    def _flatten(self, node: fx.Node) -> None:
        source = ops.tensor_arg(node)
        in_phys = self.phys[source] if source in self.phys else self.physical(source, 1)
        spatial = self.a.values[source][0, 0].numel()
        layout = expand(in_phys.layout, spatial)
        if in_phys.node is None:
            self._record(node, Physical(None, layout))
            return
        self._record(node, Physical(self._copy(node, {source: in_phys.node}), layout))

    def _batch_size(self, node: fx.Node) -> None:
        source = node.args[0]
        phys = self.phys.get(source)
        holder = phys.node if phys is not None else self.env[source]
        holder = holder if holder is not None else self.batch_source
        self.env[node] = self.graph.call_method("size", (holder, 0))
