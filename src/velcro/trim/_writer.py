"""The graph writer under ``trim``'s code generation: physical tensors and their layouts.

Each tensor of the original graph becomes a *physical* tensor holding some of its channels
(``layout``: channel ids in the order they are stored); the writer copies nodes, registers
modules, and rebuilds a full tensor (:class:`Materialize`) where a consumer needs every
channel. :mod:`velcro.trim._build` (the pass) and :mod:`velcro.trim._sum` (residual sums)
write through it.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from velcro.trim._analysis import Analysis, ChannelState, Physical, positions
from velcro.trim._modules import Materialize
from velcro.trim._widths import WidthChooser


class GraphWriter:
    """State shared by the trimming pass: the new graph, its modules and the layouts."""
    def __init__(self, gm: fx.GraphModule, analysis: Analysis,
                 widths: WidthChooser | None = None) -> None:
        self.gm = gm
        self.a = analysis
        self.widths = widths if widths is not None else WidthChooser(1, torch.device("cpu"))
        self.graph = fx.Graph()
        self.modules: dict[str, object] = {}
        self.env: dict[fx.Node, fx.Node] = {}
        self.phys: dict[fx.Node, Physical] = {}
        self.materialized: dict[fx.Node, fx.Node] = {}
        self.batch_source: fx.Node | None = None
        # new producer node -> (module target, axis); where a sum's constants can go.
        self.producers: dict[fx.Node, str] = {}
        self.fresh: set[fx.Node] = set()
        self.sites: dict[fx.Node, fx.Node | None] = {}
        # node -> rank of each channel in its residual stream's order (``_order``)
        self.orders: dict[fx.Node, torch.Tensor] = {}
        self.counter = 0

    # -- helpers -------------------------------------------------------------------------
    def in_stream_order(self, node: fx.Node, layout: torch.Tensor) -> torch.Tensor:
        """``layout`` (channel ids) in ``node``'s residual stream order, where it has one."""
        order = self.orders.get(node)
        return layout if order is None else layout[order[layout].argsort()]

    def _register(self, target: str, module: object) -> str:
        name = target
        while name in self.modules and self.modules[name] is not module:
            self.counter += 1
            name = f"{target}_{self.counter}"
        self.modules[name] = module
        return name

    def _helper(self, kind: str, module: nn.Module, args: tuple) -> fx.Node:
        self.counter += 1
        target = self._register(f"velcro.{kind}_{self.counter}", module)
        node = self.graph.call_module(target, args)
        self.fresh.add(node)
        return node

    def state(self, node: fx.Node, axis: int) -> ChannelState:
        if node in self.a.states:
            return self.a.states[node]
        value = self.a.values[node]
        channels = value.shape[axis]
        return ChannelState(axis, torch.zeros(channels, dtype=torch.bool), torch.zeros_like(value))

    def physical(self, node: fx.Node, axis: int) -> Physical:
        if node in self.phys:
            return self.phys[node]
        channels = self.a.values[node].shape[axis]
        return Physical(self.env[node], torch.arange(channels))

    def materialize(self, node: fx.Node) -> fx.Node:
        """The full tensor of ``node``: computed channels and constants in place."""
        if node not in self.phys:
            return self.env[node]
        if node in self.materialized:
            return self.materialized[node]
        phys, state = self.phys[node], self.a.states[node]
        channels = state.channels
        if phys.node is not None and torch.equal(phys.layout, torch.arange(channels)):
            return phys.node
        where = positions(phys.layout, channels)
        missing = (where < 0).nonzero().flatten()
        assert bool(state.const[missing].all()), f"{node.name}: channels lost"
        order = where.clone()
        order[missing] = phys.layout.numel() + torch.arange(missing.numel())
        constant = state.value.index_select(state.axis, missing)
        module = Materialize(constant, order, state.axis, computed=phys.node is not None)
        source = phys.node if phys.node is not None else self.batch_source
        result = self._helper("materialize", module, (source,))
        self.materialized[node] = result
        return result

    def _map_args(self, node: fx.Node, replace: dict[fx.Node, fx.Node] | None = None):
        replace = replace or {}

        def lookup(n: fx.Node) -> fx.Node:
            if n in replace:
                return replace[n]
            return self.materialize(n) if n in self.phys else self.env[n]

        return fx.node.map_arg(node.args, lookup), fx.node.map_arg(node.kwargs, lookup)

    def _copy(self, node: fx.Node, replace: dict[fx.Node, fx.Node] | None = None) -> fx.Node:
        args, kwargs = self._map_args(node, replace)
        if node.op == "call_module" and node.target not in self.modules:
            self._register(node.target, self.gm.get_submodule(node.target))
        if node.op == "get_attr":
            value = self.gm
            for part in node.target.split("."):
                value = getattr(value, part)
            self.modules[node.target] = value
        new = self.graph.create_node(node.op, node.target, args, kwargs, node.name)
        new.meta = dict(node.meta)
        return new

    def resolve_attributes(self) -> None:
        """Give a get_attr of the original model a name of its own where a rebuilt module
        now sits on its path: ``conv.weight`` read by the model beside a trimmed ``conv``
        must stay the original weight, not become the trimmed module's."""
        renamed: dict[str, str] = {}
        for node in self.graph.nodes:
            if node.op != "get_attr":
                continue
            if node.target in renamed:
                node.target = renamed[node.target]
                continue
            parts = node.target.split(".")
            for cut in range(1, len(parts)):
                owner = self.modules.get(".".join(parts[:cut]))
                if not isinstance(owner, nn.Module):
                    continue
                value = self.modules[node.target]
                held = owner
                for part in parts[cut:]:
                    held = getattr(held, part, None)
                if held is not value:
                    self.counter += 1
                    target = self._register(f"velcro.attr_{self.counter}", value)
                    renamed[node.target] = target
                    del self.modules[node.target]
                    node.target = target
                break

    def _record(self, node: fx.Node, phys: Physical) -> None:
        self.phys[node] = phys
        if node in self.a.site_units:
            self.sites[node] = phys.node
