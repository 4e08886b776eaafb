"""The layer behind each activation site: producer, batch-norm, residual addend, activation.

``sites.find_sites`` names a site's producer; the skipping kernel and the hardware model need
more: the producer's node (for its weight and input), an eval batch-norm to fold, and a
residual tensor added before the activation (ResNet's ``out += identity; relu(out)``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from velcro.graph._plain import is_plain
from velcro.graph.sites import find_sites

_ADDS = (operator.add, operator.iadd, torch.add)
KERNEL_KINDS = ("relu", "relu6", "silu", "gelu", "hardswish")
_CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d)


def batchnorm_affine(norm: nn.modules.batchnorm._BatchNorm,
                     dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` per channel of an eval-mode batch-norm: ``norm(x) = x*scale + shift``,
    computed in ``dtype`` (default: the running statistics' own)."""
    dtype = dtype or norm.running_var.dtype
    scale = norm.running_var.detach().to(dtype).add(norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.detach().to(dtype)
    shift = -norm.running_mean.detach().to(dtype) * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach().to(dtype)
    return scale, shift


@dataclass(frozen=True)
class SiteLayer:
    """How one activation site is computed, as node names of the traced graph.

    Attributes:
        site: the site name (see :mod:`velcro.graph`).
        activation: the activation node.
        kind: ``relu``, ``relu6``, ``silu``, ``gelu``, ``gelu_tanh`` or ``hardswish``.
        producer: the conv/linear node feeding the activation.
        batch_norm: an eval ``BatchNorm`` module node between producer and activation, if any.
        residual: the other operand of an addition before the activation, if any.
        weight_shape: the producer's weight shape (out, in / groups, *kernel).
    """

    site: str
    activation: str
    kind: str
    producer: str
    batch_norm: str | None
    residual: str | None
    weight_shape: tuple[int, ...]


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADDS
    return node.op == "call_method" and node.target in ("add", "add_")


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _weight_shape(gm: fx.GraphModule, node: fx.Node) -> tuple[int, ...] | None:
    module = _module(gm, node)
    if is_plain(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        return tuple(module.weight.shape)
    if node.op == "call_function" and (node.target in _CONV_FUNCTIONS or node.target is F.linear):
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            return tuple(gm.get_parameter(weight.target).shape)
    return None


def _chain(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node | None] | None:
    """``node`` is a producer, or an eval batch-norm of one: (producer, batch-norm)."""
    if _weight_shape(gm, node) is not None:
        return node, None
    module = _module(gm, node)
    if is_plain(module, nn.modules.batchnorm._BatchNorm) and isinstance(node.args[0], fx.Node):
        inner = node.args[0]
        if _weight_shape(gm, inner) is not None and module.track_running_stats:
            return inner, node
    return None


def _kind(gm: fx.GraphModule, node: fx.Node, kind: str) -> str:
    if kind != "gelu":
        return kind
    module = _module(gm, node)
    approximate = getattr(module, "approximate", None) or node.kwargs.get("approximate", "none")
    return "gelu_tanh" if approximate == "tanh" else "gelu"


def site_layers(gm: fx.GraphModule) -> dict[str, SiteLayer]:
    """The sites whose input is ``[bn](producer(x)) [+ residual]``, by site name.

    Sites fed some other way (through dropout, a sum of two batch-norms of sums, ...) are left
    out: neither the kernel nor the hardware model knows what computes them.
    """
    by_name = {node.name: node for node in gm.graph.nodes}
    layers = {}
    for site in find_sites(gm):
        if site.kind not in KERNEL_KINDS:  # the kernels compute these activations only
            continue
        act = by_name[site.node]
        node, residual = act.args[0], None
        if _is_add(node) and len(node.args) >= 2 and all(
            isinstance(a, fx.Node) for a in node.args[:2]
        ):
            first, second = node.args[0], node.args[1]
            if _chain(gm, first) is not None:
                node, residual = first, second
            elif _chain(gm, second) is not None:
                node, residual = second, first
        found = _chain(gm, node)
        if found is None:
            continue
        producer, batch_norm = found
        layers[site.name] = SiteLayer(
            site.name, act.name, _kind(gm, act, site.kind), producer.name,
            batch_norm.name if batch_norm is not None else None,
            residual.name if residual is not None else None,
            _weight_shape(gm, producer),
        )
    return layers


def producer_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Every site's producer node (conv or linear), found as :func:`find_sites` finds it."""
    from velcro.graph.sites import see_through

    def walk(node: fx.Node, seen: set[str]) -> fx.Node | None:
        if node.name in seen:
            return None
        seen.add(node.name)
        if _weight_shape(gm, node) is not None:
            return node
        for arg in see_through(gm, node) or []:
            found = walk(arg, seen)
            if found is not None:
                return found
        return None

    by_name = {node.name: node for node in gm.graph.nodes}
    result = {}
    for site in find_sites(gm):
        found = walk(by_name[site.node].args[0], set())
        if found is not None:
            result[site.name] = found
    return result


def weight_shape(gm: fx.GraphModule, node: fx.Node) -> tuple[int, ...] | None:
    """The weight shape of a conv/linear node (module or functional with a parameter)."""
    return _weight_shape(gm, node)
