"""Site discovery: the activation calls of a traced model that velcro can compress.

A *site* is one activation call in the traced graph (torch.fx) whose input comes from a
convolution or linear layer, possibly through batch-norm, residual additions, dropout or
identity. A module called twice is two sites; a functional ``F.relu`` is a site too.

Site names are stable and readable:
- a module called once: its qualified name (``layer1.0.relu``);
- a module called n > 1 times: ``layer1.0.relu:0`` ... ``layer1.0.relu:{n-1}``;
- a functional call: the qualified name of the module whose ``forward`` makes it, then the
  function's name (``inception3a.branch1.relu``), numbered the same way when repeated.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

ACTIVATION_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.SiLU: "silu",
    nn.GELU: "gelu",
    nn.Hardswish: "hardswish",
}
ACTIVATION_FUNCTIONS: dict[object, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu_: "relu",
    F.relu6: "relu6",
    F.silu: "silu",
    F.gelu: "gelu",
    F.hardswish: "hardswish",
}
ACTIVATION_METHODS: dict[str, str] = {"relu": "relu", "relu_": "relu"}

PRODUCER_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
PRODUCER_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, F.linear)
# Ops an activation may see its producer through.
TRANSPARENT_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Identity, nn.Dropout, nn.Dropout2d,
)
TRANSPARENT_FUNCTIONS = (
    operator.add, operator.iadd, torch.add, F.batch_norm, F.dropout,
)


@dataclass(frozen=True)
class Site:
    """One activation call of a traced model.

    Attributes:
        name: stable, readable site name (see the module docstring).
        node: name of the activation node in the traced graph.
        kind: ``relu``, ``relu6``, ``silu``, ``gelu`` or ``hardswish``.
        producer: qualified name of the conv/linear module that feeds it, or of the
            function (``F.conv2d``) when the producer is functional.
        channel_axis: the channel axis of the per-image activation (batch axis removed):
            0 after a convolution, the last axis after a linear layer.

    Example:
        >>> site = velcro.find_sites(velcro.trace(velcro.models.resnet18()))[0]
        >>> site.name, site.kind, site.producer
        ('relu', 'relu', 'conv1')
    """

    name: str
    node: str
    kind: str
    producer: str
    channel_axis: int


def _activation_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_module":
        return ACTIVATION_MODULES.get(type(gm.get_submodule(node.target)))
    if node.op == "call_function":
        try:
            return ACTIVATION_FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return ACTIVATION_METHODS.get(node.target)
    return None


def _producer(gm: fx.GraphModule, node: fx.Node, seen: set[str] | None = None) -> str | None:
    """The conv/linear that feeds ``node`` through transparent ops, or None."""
    seen = seen if seen is not None else set()
    if node.name in seen:
        return None
    seen.add(node.name)
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, PRODUCER_MODULES):
            return node.target
        if not isinstance(module, TRANSPARENT_MODULES):
            return None
    elif node.op == "call_function":
        if node.target in PRODUCER_FUNCTIONS:
            return f"{getattr(node.target, '__name__', node.target)}@{node.name}"
        if node.target not in TRANSPARENT_FUNCTIONS:
            return None
    elif node.op == "call_method":
        if node.target not in ("add", "add_"):
            return None
    else:
        return None
    for arg in node.all_input_nodes:
        found = _producer(gm, arg, seen)
        if found is not None:
            return found
    return None


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    last = list(stack.values())[-1]
    return last[0] if isinstance(last, tuple) else str(last)


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """All activation sites of a traced model, in graph order.

    Example:
        >>> [s.name for s in find_sites(trace(model))][:2]
        ['relu', 'layer1.0.relu:0']
    """
    found: list[tuple[fx.Node, str, str, str]] = []
    for node in gm.graph.nodes:
        kind = _activation_kind(gm, node)
        if kind is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        producer = _producer(gm, node.args[0])
        if producer is None:
            continue
        if node.op == "call_module":
            base = node.target
        else:
            scope = _scope(node)
            fname = node.target if isinstance(node.target, str) else node.target.__name__
            fname = fname.rstrip("_")
            base = f"{scope}.{fname}" if scope else fname
        found.append((node, kind, producer, base))

    counts: dict[str, int] = defaultdict(int)
    for _, _, _, base in found:
        counts[base] += 1
    seen: dict[str, int] = defaultdict(int)
    sites = []
    for node, kind, producer, base in found:
        if counts[base] > 1:
            name = f"{base}:{seen[base]}"
            seen[base] += 1
        else:
            name = base
        linear = _is_linear(gm, producer)
        sites.append(Site(name, node.name, kind, producer, -1 if linear else 0))
    return sites


def _is_linear(gm: fx.GraphModule, producer: str) -> bool:
    if producer.startswith("linear@"):
        return True
    try:
        return isinstance(gm.get_submodule(producer), nn.Linear)
    except AttributeError:
        return False


def site_nodes(gm: fx.GraphModule, sites: list[Site]) -> dict[str, fx.Node]:
    """Map site name -> its node in ``gm``.

    Example:
        >>> gm = trace(velcro.models.resnet18())
        >>> site_nodes(gm, find_sites(gm))["layer1.0.relu:0"].op
        'call_module'
    """
    by_name = {node.name: node for node in gm.graph.nodes}
    return {site.name: by_name[site.node] for site in sites}


def insert_after_sites(
    gm: fx.GraphModule, sites: list[Site], modules: dict[str, nn.Module], prefix: str
) -> fx.GraphModule:
    """Insert ``modules[site.name]`` right after each site's node; users see its output.

    The modules are registered as ``{prefix}_{i}`` submodules of ``gm``. This is the one
    graph rewrite that calibration and ``apply`` share.

    Example:
        >>> gm = trace(model)
        >>> sites = find_sites(gm)
        >>> gm = insert_after_sites(gm, sites, {s.name: nn.Identity() for s in sites}, "probe")
    """
    nodes = site_nodes(gm, sites)
    for index, site in enumerate(sites):
        if site.name not in modules:
            continue
        node = nodes[site.name]
        target = f"{prefix}_{index}"
        gm.add_submodule(target, modules[site.name])
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(target, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
    gm.graph.lint()
    gm.recompile()
    return gm
