"""Why a planned site's producer keeps filters: the trim report.

For every site the plan makes (partly) constant, the trimmed model records whether the layer
that computes the site's channels (``Site.producer``) stopped computing them, and if not,
why: the first reader that still needs those channels, found by following the liveness
analysis's demands forward from the producer through the operations that only pass channels
on (batch-norm, activations, sums, concatenations). Typical reasons: another branch reads
the same tensor (a residual shortcut, a DenseNet concatenation), an operation trimming does
not see through reads it in full, or nothing trimming knows computes the site (a producer
it leaves whole).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from velcro.graph.sites import see_through
from velcro.trim import _ops as ops
from velcro.trim._analysis import Analysis

_PASS_ON = ("channelwise", "sum")


def _label(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"'{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return f"'{node.name}' ({getattr(node.target, '__name__', 'function')})"
    if node.op == "call_method":
        return f"'{node.name}' (.{node.target})"
    return f"'{node.name}'"


def _producer_path(gm: fx.GraphModule, site: fx.Node, producer: str) -> list[fx.Node] | None:
    """Nodes from the site back to the producer (site first), as the site walk finds it."""
    seen: set[fx.Node] = set()

    def walk(node: fx.Node) -> list[fx.Node] | None:
        if node in seen:
            return None
        seen.add(node)
        if node.op == "call_module" and node.target == producer:
            return [node]
        for source in see_through(gm, node) or []:
            found = walk(source)
            if found is not None:
                return [node, *found]
        return None

    for source in see_through(gm, site) or [site.args[0]]:
        path = walk(source)
        if path is not None:
            return [site, *path]
    return None


def _to_producer(analysis: Analysis, path: list[fx.Node], channels: torch.Tensor
                 ) -> torch.Tensor | None:
    """The site's channels (bool) as channels of the producer at the end of ``path``."""
    current = channels
    state = analysis.states[path[0]]
    axis = -1 if state.axis == state.value.dim() - 1 else state.axis  # linear: the last
    for node, source in zip(path, path[1:], strict=False):
        kind = analysis.kinds.get(node)
        state = analysis.states.get(source)
        value = analysis.values.get(source)
        if state is None and not isinstance(value, torch.Tensor):
            return None
        if state is None and value.dim() <= axis:
            return None
        count = state.channels if state is not None else value.shape[axis]
        if kind not in ("cat", "select", "chanpad") and current.numel() == count:
            continue  # channelwise ops, sums, a gate's product, a norm: channel c stays c
        if state is None:
            return None
        if kind == "cat":
            offset = 0
            for part in ops.cat_inputs(node)[0]:
                size = analysis.values[part].shape[analysis.states[node].axis]
                if part is source:
                    current = current[offset:offset + size]
                    break
                offset += size
            continue
        if kind in ("select", "chanpad") and analysis.ranges[node][0] is source:
            start = analysis.ranges[node][1]
            mapped = torch.zeros(state.channels, dtype=torch.bool)
            if kind == "select":
                mapped[start:start + current.numel()] = current
            else:
                mapped = current[start:start + state.channels]
            current = mapped
            continue
        return None
    return current


def _into(analysis: Analysis, reader: fx.Node, source: fx.Node,
          channels: torch.Tensor) -> torch.Tensor | None:
    """``source``'s channels as the channels of ``reader``'s output, where it passes them
    on one to one (else None)."""
    kind = analysis.kinds.get(reader)
    state = analysis.states.get(reader)
    if state is None:
        return None
    if kind in _PASS_ON and state.channels == channels.numel():
        return channels
    mapped = torch.zeros(state.channels, dtype=torch.bool)
    if kind == "cat":
        offset = 0
        for part in ops.cat_inputs(reader)[0]:
            size = analysis.values[part].shape[state.axis]
            if part is source:
                mapped[offset:offset + size] = channels
                return mapped
            offset += size
        return None
    if kind == "select":
        _, start, stop = analysis.ranges[reader]
        return channels[start:stop].clone()
    if kind == "chanpad":
        before = analysis.ranges[reader][1]
        mapped[before:before + channels.numel()] = channels
        return mapped
    return None


def _why(gm: fx.GraphModule, analysis: Analysis, node: fx.Node, channels: torch.Tensor,
         depth: int = 0) -> str:
    """The first reader, downstream of ``node``, that needs ``channels`` computed."""
    for reader, wanted in analysis.demands.get(node, []):
        overlap = channels & wanted
        if not bool(overlap.any()):
            continue
        kind = analysis.kinds.get(reader)
        onward = _into(analysis, reader, node, overlap) if depth < 60 else None
        if onward is not None and bool(onward.any()):
            found = _why(gm, analysis, reader, onward, depth + 1)
            if found != _UNKNOWN:
                return found
        if kind in ("producer", "grouped"):
            return f"read by the layer {_label(gm, reader)} on another path"
        if kind == "cat":
            return f"concatenated by {_label(gm, reader)} and read from there"
        if reader.op == "output":
            return "the model outputs it"
        if kind in ("channelwise", "sum", "select", "chanpad"):
            continue
        return f"read in full by {_label(gm, reader)}, {_opaque_kind(gm, reader)}"
    return _UNKNOWN


_UNKNOWN = "needed downstream"
_MIXING = ("groupnorm", "layernorm", "softmax", "matmul", "linear", "permute", "transpose",
           "mean", "sum", "mul")


def _opaque_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__",
                                                                      "")
    if node.op == "call_module":
        name = type(gm.get_submodule(node.target)).__name__.lower()
    if any(word in name.replace("_", "") for word in _MIXING):
        return "which mixes or rescales the channels (trimming cannot drop one of them)"
    return "an operation trimming does not see through"


def site_report(gm: fx.GraphModule, analysis: Analysis, site, site_node: fx.Node,
                units: torch.Tensor) -> dict:
    """One planned site's entry: producer, filters planned and removed, and why not all."""
    entry = {"producer": site.producer, "planned": int(units.numel()), "removed": 0,
             "reason": None}
    path = _producer_path(gm, site_node, site.producer)
    producer = path[-1] if path else None
    if producer is None or producer not in analysis.states:
        entry["reason"] = ("trimming does not see a layer it can cut behind this site (its "
                           "producer is left whole; the site's constants are still folded "
                           "into the layers that read it)")
        return entry
    chosen = torch.zeros(analysis.states[site_node].channels, dtype=torch.bool)
    chosen[units] = True
    mapped = _to_producer(analysis, path, chosen)
    if mapped is None:
        entry["reason"] = "the site's channels do not map one to one onto the producer's"
        return entry
    kept = mapped & analysis.needed[producer]
    entry["removed"] = int(mapped.sum() - kept.sum())
    if bool(kept.any()):
        entry["reason"] = _why(gm, analysis, producer, kept)
    return entry


def summary(report: dict[str, dict]) -> str | None:
    """One line when some planned sites keep filters, else None."""
    keeping = [name for name, entry in report.items() if entry["reason"]]
    if not keeping:
        return None
    return (f"velcro.trim: the producers of {len(keeping)} of {len(report)} planned sites keep "
            f"some of their planned filters (e.g. '{keeping[0]}': "
            f"{report[keeping[0]]['reason']}); small.velcro_trim_report lists each with why")
