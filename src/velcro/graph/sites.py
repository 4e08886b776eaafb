"""Site discovery: the activation calls of a traced model that velcro can compress.

A *site* is one activation call in the traced graph (torch.fx) whose input channels are the
output channels of a convolution or linear layer (its *producer*), reached backwards through
operations that keep every channel in its place:

- channel norms: batch-norm (module or ``F.batch_norm``, timm's ``BatchNormAct2d``) and
  group-norm (pre-activation ResNets: ``GroupNorm -> ReLU -> conv``);
- identity, dropout, and spatial operations: pooling, upsampling, padding, slicing
  (``x[:, :, ::2, ::2]``, a channel range ``x[:, :n]``, a part of ``torch.split``);
- sums (residual additions), concatenations (DenseNet, DPN, MixNet: every part's channels
  keep their place), products with a gate (squeeze-and-excitation: ``x * gate``);
- for a linear producer, reshapes of the leading (batch, token) axes that keep the channel
  axis last (LeViT's ``bn(x.flatten(0, 1)).reshape_as(x)``).

The plan's constants there are per channel (or element) of that layer, and trimming has a
producer whose filters it may drop (where nothing else reads them) or, at least, consumers
whose input columns it folds into their bias.
Activation kinds: ``relu``, ``relu6``, ``leaky_relu``, ``hardtanh``, ``elu``, ``selu``,
``celu``, ``mish``, ``silu``, ``gelu``, ``hardswish``. Not sites: gates (``sigmoid``,
``hardsigmoid``, ``tanh``) scale another tensor and their producers run on pooled 1x1 maps
(nothing worth saving); an activation of an activation; activations after operations that
move or mix channels (permutes, matmuls, attention, softmax, other reshapes). A module whose
class computes something of its own (a subclass with its own ``forward``) is neither an
activation nor a producer here: ``velcro.trace`` traces into such modules.

A module called twice is two sites; a functional ``F.relu`` is a site too.
Site names are stable and readable:
- a module called once: its qualified name (``layer1.0.relu``);
- a module called n > 1 times: ``layer1.0.relu:0`` ... ``layer1.0.relu:{n-1}``;
- a functional call: the qualified name of the module whose ``forward`` makes it, then the
  function's name (``inception3a.branch1.relu``), numbered the same way when repeated.
A functional producer (``F.conv2d`` whose weight is a module's parameter, possibly computed
from it as in weight standardisation) is named by that module (``stem.conv``), else
``conv2d@<node>``.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from velcro.graph._plain import hashable, is_plain

ACTIVATION_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.Hardtanh: "hardtanh",
    nn.ELU: "elu",
    nn.SELU: "selu",
    nn.CELU: "celu",
    nn.Mish: "mish",
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
    F.leaky_relu: "leaky_relu",
    F.leaky_relu_: "leaky_relu",
    F.hardtanh: "hardtanh",
    F.hardtanh_: "hardtanh",
    F.elu: "elu",
    F.elu_: "elu",
    F.selu: "selu",
    torch.selu: "selu",
    F.celu: "celu",
    F.mish: "mish",
    F.silu: "silu",
    F.gelu: "gelu",
    F.hardswish: "hardswish",
}
ACTIVATION_METHODS: dict[str, str] = {"relu": "relu", "relu_": "relu"}

PRODUCER_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
PRODUCER_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, F.linear)
# Ops an activation may see its producer through (first argument), see the module docstring.
TRANSPARENT_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.Identity, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
    nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d,
    nn.ReplicationPad2d,
)
TRANSPARENT_FUNCTIONS = (
    F.batch_norm, F.group_norm, F.dropout, F.pad, F.interpolate, F.max_pool1d, F.max_pool2d,
    F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
)
# Every tensor argument is followed: sums, products with a gate, concatenations.
_JOINS = (operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul,
          torch.cat, torch.concat)
_JOIN_METHODS = ("add", "add_", "mul", "mul_")
_LEADING_RESHAPES = ("reshape_as", "view_as", "contiguous")


@dataclass(frozen=True)
class Site:
    """One activation call of a traced model.

    Attributes:
        name: stable, readable site name (see the module docstring).
        node: name of the activation node in the traced graph.
        kind: the activation (see the module docstring: ``relu``, ``leaky_relu``, ...).
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


def module_kind(module: nn.Module) -> str | None:
    """The activation kind of a module that computes exactly its torch.nn class's function."""
    for klass in type(module).__mro__:
        if klass in ACTIVATION_MODULES:
            if not is_plain(module, klass):
                return None
            if klass is nn.Hardtanh and (module.min_val, module.max_val) == (0.0, 6.0):
                return "relu6"
            return ACTIVATION_MODULES[klass]
    return None


def _activation_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_module":
        return module_kind(gm.get_submodule(node.target))
    if node.op == "call_function":
        kind = ACTIVATION_FUNCTIONS.get(node.target) if hashable(node.target) else None
        if kind == "hardtanh":
            low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
            high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
            return "relu6" if (low, high) == (0.0, 6.0) else kind
        return kind
    if node.op == "call_method":
        return ACTIVATION_METHODS.get(node.target)
    return None


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if n.op != "get_attr"]


def see_through(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node] | None:
    """The inputs a site's walk continues to behind ``node``, or None where it stops."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return [first] if first is not None and is_plain(module, TRANSPARENT_MODULES) else None
    if node.op == "call_function" and hashable(node.target):
        if node.target in _JOINS:
            return _tensor_inputs(node)
        if node.target in TRANSPARENT_FUNCTIONS and first is not None:
            return [first]
        if node.target is operator.getitem and first is not None and (
                _slices(node) or _split_part(first)):
            return [first.args[0]] if _split_part(first) else [first]
        return None
    if node.op == "call_method" and first is not None:
        if node.target in _JOIN_METHODS:
            return _tensor_inputs(node)
        if node.target in _LEADING_RESHAPES or node.target == "flatten" and tuple(
                node.args[1:3]) == (0, 1):
            return [first]
    return None


def _slices(node: fx.Node) -> bool:
    """``x[:, a:b]``, ``x[:, :, ::2, ::2]``: slices (channels keep their order)."""
    index = node.args[1]
    return (isinstance(index, tuple) and len(index) >= 2 and index[0] == slice(None)
            and all(isinstance(i, slice) or i is Ellipsis for i in index[1:]))


def _split_part(node: fx.Node) -> bool:
    """``node`` is ``torch.split``/``chunk`` of a tensor (its parts are channel ranges)."""
    if node.op == "call_function":
        return node.target in (torch.split, torch.chunk) and bool(node.args) and isinstance(
            node.args[0], fx.Node)
    return node.op == "call_method" and node.target in ("split", "chunk")


def functional_producer_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """``F.conv2d``/``F.linear``: the module whose parameter is its weight, else fn@node."""
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    owner = _parameter_owner(gm, weight, set()) if isinstance(weight, fx.Node) else None
    if owner is not None:
        return owner
    return f"{getattr(node.target, '__name__', node.target)}@{node.name}"


def _parameter_owner(gm: fx.GraphModule, node: fx.Node, seen: set) -> str | None:
    """The module owning the one ``weight`` parameter a weight is computed from, where the
    computation reads no graph input (weight standardisation, scaling by a gain)."""
    owners: set[str] = set()
    frontier = [node]
    while frontier:
        current = frontier.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            return None
        if current.op == "get_attr":
            owner, _, name = current.target.rpartition(".")
            if owner and name == "weight":
                owners.add(owner)
            continue
        frontier.extend(current.all_input_nodes)
    return owners.pop() if len(owners) == 1 else None


def _producer(gm: fx.GraphModule, node: fx.Node, seen: set[str] | None = None) -> str | None:
    """The conv/linear that feeds ``node`` through transparent ops, or None."""
    seen = seen if seen is not None else set()
    if node.name in seen:
        return None
    seen.add(node.name)
    if node.op == "call_module" and is_plain(gm.get_submodule(node.target), PRODUCER_MODULES):
        return node.target
    if node.op == "call_function" and hashable(node.target) and (
            node.target in PRODUCER_FUNCTIONS):
        return functional_producer_name(gm, node)
    for source in see_through(gm, node) or []:
        found = _producer(gm, source, seen)
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
        module = gm.get_submodule(producer)
    except AttributeError:
        return False
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)  # a module calling F.linear on its weight
    return not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and isinstance(
        weight, torch.Tensor) and weight.dim() == 2


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
