"""Grouped convolutions (1 < groups < input channels: ResNeXt, RegNet, DPN).

Output channel o of group g reads only the input channels of group g. So:

- constants: the outputs of a group whose inputs are all constant are constants;
- liveness: a group any of whose outputs is needed demands its inputs; the others demand
  nothing (their inputs may go, with the filters that made them);
- code: a convolution of the groups that compute something, each with the same number of
  filters and of input channels (the largest among them; a group with fewer gets zero
  filters and zero-weight inputs, so that the groups stay one dense grouped convolution).
  Each group's constant inputs fold into its filters' bias (a map where padding makes the
  contribution position-dependent). The input is gathered into that group-by-group order,
  unless its producer already computes it so (``request``: the producer's filters are then
  ordered by group, padded, and nothing is copied).
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from velcro.trim import _ops as ops
from velcro.trim._modules import ChannelSelect, rebuild, split_uniform
from velcro.trim._state import PAD, ChannelState, Physical, fresh, run_on


def forward(gm: fx.GraphModule, node: fx.Node, values: dict[fx.Node, object],
            states: dict[fx.Node, ChannelState]) -> None:
    module = gm.get_submodule(node.target)
    source = ops.tensor_arg(node)
    known = states[source]
    groups = module.groups
    state = fresh(values[node], 1)
    const_groups = known.const.view(groups, -1).all(dim=1)
    if bool(const_groups.any()):
        state.const = const_groups.repeat_interleave(state.channels // groups)
        out = run_on(gm, node, {source: known.value})
        state.value = out * state.const.view(1, -1, *[1] * (out.dim() - 2)).to(out.dtype)
    states[node] = state


def demanded(module, needed: torch.Tensor, in_channels: int) -> torch.Tensor:  # noqa: ANN001
    """The input channels the needed outputs read (whole groups)."""
    groups = module.groups
    live = needed.view(groups, -1).any(dim=1)
    return live.repeat_interleave(in_channels // groups)


def plan_layouts(module, needed: torch.Tensor, present: torch.Tensor,  # noqa: ANN001
                 in_channels: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(input layout, output layout, kept groups): per kept group, its present input
    channels and its needed outputs, each padded to the largest group's count."""
    groups = module.groups
    in_per, out_per = in_channels // groups, needed.numel() // groups
    kept = [g for g in range(groups) if bool(needed[g * out_per:(g + 1) * out_per].any())]
    ins = [present[g * in_per:(g + 1) * in_per].nonzero().flatten() + g * in_per for g in kept]
    outs = [needed[g * out_per:(g + 1) * out_per].nonzero().flatten() + g * out_per
            for g in kept]
    width_in = max((i.numel() for i in ins), default=0)
    width_out = max((o.numel() for o in outs), default=0)

    def padded(parts: list[torch.Tensor], width: int) -> torch.Tensor:
        if not parts:
            return torch.zeros(0, dtype=torch.int64)
        return torch.cat([torch.cat([p, torch.full((width - p.numel(),), PAD)])
                          for p in parts])

    return padded(ins, max(width_in, 1)), padded(outs, width_out), kept


def input_request(gm: fx.GraphModule, node: fx.Node, needed: torch.Tensor,
                  present: torch.Tensor) -> torch.Tensor:
    """The input layout the grouped convolution ``node`` wants (see ``plan_layouts``)."""
    module = gm.get_submodule(node.target)
    return plan_layouts(module, needed, present, module.in_channels)[0]


def emit(writer, node: fx.Node) -> None:  # noqa: ANN001  (a GraphWriter)
    module = writer.gm.get_submodule(node.target)
    source = ops.tensor_arg(node)
    in_state = writer.state(source, 1)
    in_phys = writer.physical(source, 1)
    needed = writer.a.needed[node]
    present = torch.zeros(in_state.channels, dtype=torch.bool)
    present[in_phys.layout[in_phys.layout >= 0]] = True
    in_layout, out_layout, kept = plan_layouts(module, needed, present, module.in_channels)
    if not kept or in_phys.node is None:
        writer._record(node, Physical(None, out_layout[out_layout >= 0]))
        return
    inputs = in_phys.node
    if not _matches(in_phys.layout, in_layout):
        where = torch.zeros(in_state.channels + 1, dtype=torch.int64)  # [-1]: padding
        stored = in_phys.layout >= 0
        where[in_phys.layout[stored]] = stored.nonzero().flatten()
        inputs = writer._helper("select", ChannelSelect(where[in_layout], 1), (inputs,))
    weight = module.weight.detach()
    in_per = module.in_channels // module.groups
    per_out = out_layout.numel() // len(kept)
    columns = torch.where(in_layout >= 0, in_layout % in_per, 0).view(len(kept), -1)
    columns = columns.repeat_interleave(per_out, dim=0)  # (outputs, inputs per group)
    rows = out_layout.clamp_min(0)
    kernel = weight.shape[2:]
    index = columns.view(*columns.shape, *[1] * len(kernel)).expand(*columns.shape, *kernel)
    new_weight = torch.gather(weight.index_select(0, rows), 1, index).clone()
    new_weight[out_layout < 0] = 0.0
    padding = (in_layout < 0).view(len(kept), -1).repeat_interleave(per_out, dim=0)
    new_weight[padding] = 0.0
    bias = (module.bias.detach().double().index_select(0, rows) if module.bias is not None
            else torch.zeros(out_layout.numel(), dtype=torch.float64))
    folded = in_state.const & ~present
    bias_map = torch.empty(0)
    if bool(folded.any()):
        with torch.no_grad():
            contribution = module._conv_forward(in_state.mask(folded), weight, None)
        contribution = contribution.double().index_select(1, rows)
        contribution[:, out_layout < 0] = 0.0
        uniform, bias_map = split_uniform(contribution, 1)
        bias = bias + uniform
    bias[out_layout < 0] = 0.0
    shell = copy.copy(module)
    shell.groups = len(kept)
    new = rebuild(shell, new_weight, bias, bias_map)
    target = writer._register(node.target, new)
    new_node = writer.graph.call_module(target, (inputs,))
    writer.producers[new_node] = target
    writer.fresh.add(new_node)
    writer._record(node, Physical(new_node, out_layout))


def _matches(stored: torch.Tensor, wanted: torch.Tensor) -> bool:
    """``stored`` can serve as ``wanted`` (padding positions may hold anything)."""
    if stored.numel() != wanted.numel():
        return False
    return bool(((wanted < 0) | (stored == wanted)).all())


def requests(gm: fx.GraphModule, analysis) -> dict[fx.Node, torch.Tensor]:  # noqa: ANN001
    """Producer -> the output layout the grouped convolution it alone feeds wants (through
    single-reader channelwise operations, which keep the layout)."""
    wanted: dict[fx.Node, torch.Tensor] = {}
    for node, kind in analysis.kinds.items():
        if kind != "grouped" or node not in analysis.states:
            continue
        chain = ops.tensor_arg(node)
        while analysis.kinds.get(chain) == "channelwise" and len(chain.users) == 1:
            source = ops.tensor_arg(chain)
            if (source not in analysis.states
                    or analysis.states[source].channels != analysis.states[chain].channels):
                break
            chain = source
        if (analysis.kinds.get(chain) != "producer" or len(chain.users) != 1
                or chain not in analysis.states
                or not isinstance(gm.get_submodule(chain.target), ops.CONV_MODULES)):
            continue
        wanted[chain] = input_request(gm, node, analysis.needed[node], analysis.needed[chain])
    return wanted
