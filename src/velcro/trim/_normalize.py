"""Before trimming: functional layers become the modules trimming knows how to cut.

A traced graph holds layers as functions where a module's own ``forward`` calls them:

- ``F.batch_norm(x, running_mean, running_var, weight, bias, training=False, ...)`` on a
  module's buffers (timm's ``BatchNormAct2d``, the most common block of its models) becomes a
  ``BatchNorm{1,2,3}d`` module with those tensors, which ``fold_batchnorm`` then folds into the
  convolution before it;
- ``F.conv{1,2,3}d`` / ``F.linear`` whose weight and bias are module parameters, or computed
  from them alone (timm's ``Conv2dSame`` after its padding, weight-standardised
  ``StdConv2d``/``ScaledStdConv2d``, its ``Linear`` head) becomes an ``nn.Conv*d`` /
  ``nn.Linear`` holding the weight as computed in eval mode. It is registered under the name of
  the module that owned the weight where that module is no longer called (so the trimmed model
  has ``stem.conv`` where the original had it), else beside it.

- a batch-norm over the channels of a linear layer's output through reshapes of its leading
  axes (LeViT's ``bn(linear(x).flatten(0, 1)).reshape_as(linear(x))``) is folded into the
  linear layer, as ``fold_batchnorm`` folds one after a convolution.

All are exact up to rounding: the same operations on the same tensors. A weight computed from
the input (dynamic convolutions) stays functional, and trimming leaves it whole.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from velcro.graph._plain import hashable, is_plain
from velcro.graph.layers import batchnorm_affine
from velcro.graph.sites import functional_producer_name
from velcro.trim import _ops as ops

_CONVS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_CONV_DEFAULTS = ("bias", "stride", "padding", "dilation", "groups")
_NORM_ARGS = ("running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def _argument(node: fx.Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _depends_on_input(node: object) -> bool:
    """``node`` is computed from a graph input (else from parameters and literals only)."""
    if not isinstance(node, fx.Node):
        return False
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            return True
        if current.op == "call_module":  # a module's output is not a parameter
            return True
        frontier.extend(current.all_input_nodes)
    return False


def _constant(values: dict[fx.Node, object], node: object) -> torch.Tensor | None:
    if node is None:
        return None
    value = values.get(node) if isinstance(node, fx.Node) else node
    return value.detach().clone() if isinstance(value, torch.Tensor) else None


class _Namer:
    """Targets for the new modules: the owner's name where nothing else uses it."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.taken: set[str] = set()

    def _in_use(self, owner: str, replaced: set[fx.Node]) -> bool:
        for node in self.gm.graph.nodes:
            if node in replaced or node.op not in ("call_module", "get_attr"):
                continue
            if node.target == owner or str(node.target).startswith(owner + "."):
                return True
        return owner in self.taken

    def target(self, owner: str | None, fallback: str, replaced: set[fx.Node]) -> str:
        if owner and not self._in_use(owner, replaced):
            self.taken.add(owner)
            return owner
        base = f"{owner or fallback}_{fallback}"
        name, index = base, 0
        while _exists(self.gm, name) or name in self.taken:
            index += 1
            name = f"{base}_{index}"
        self.taken.add(name)
        return name


def _exists(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_submodule(target)
    except AttributeError:
        return False
    return True


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    if name in parent._parameters or name in parent._buffers:
        delattr(parent, name)
    setattr(parent, name, module)


def _weight_nodes(node: fx.Node, names: tuple[str, ...], first: int) -> set[fx.Node]:
    """The nodes only the parameter computation of ``node`` uses (to drop with it)."""
    roots = [_argument(node, first + i, name) for i, name in enumerate(names)]
    found: set[fx.Node] = set()
    frontier = [r for r in roots if isinstance(r, fx.Node)]
    while frontier:
        current = frontier.pop()
        if current in found or current.op == "placeholder":
            continue
        found.add(current)
        frontier.extend(current.all_input_nodes)
    return found


def _conv_module(node: fx.Node, values: dict[fx.Node, object]) -> nn.Module | None:
    weight = _constant(values, _argument(node, 1, "weight"))
    bias_arg = _argument(node, 2, "bias")
    bias = _constant(values, bias_arg)
    if weight is None or (bias_arg is not None and bias is None):
        return None
    if node.target is F.linear:
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                           device=weight.device, dtype=weight.dtype)
    else:
        stride, padding, dilation, groups = (
            _argument(node, 3 + i, name, default) for i, (name, default) in enumerate(
                (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))))
        if not all(isinstance(v, (int, tuple, list, str)) for v in (stride, padding, dilation)) \
                or not isinstance(groups, int):
            return None
        module = _CONVS[node.target](weight.shape[1] * groups, weight.shape[0],
                                     tuple(weight.shape[2:]), stride=stride, padding=padding,
                                     dilation=dilation, groups=groups, bias=bias is not None,
                                     device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    return module


def _norm_module(node: fx.Node, values: dict[fx.Node, object]) -> nn.Module | None:
    args = {name: _argument(node, i + 1, name) for i, name in enumerate(_NORM_ARGS)}
    source = node.args[0] if node.args else None
    value = values.get(source) if isinstance(source, fx.Node) else None
    mean, var = _constant(values, args["running_mean"]), _constant(values, args["running_var"])
    if (args["training"] is not False or mean is None or var is None
            or not isinstance(value, torch.Tensor) or value.dim() not in _NORMS):
        return None
    weight, bias = _constant(values, args["weight"]), _constant(values, args["bias"])
    if (args["weight"] is not None and weight is None) or (args["bias"] is not None
                                                           and bias is None):
        return None
    eps = args["eps"] if isinstance(args["eps"], float) else 1e-5
    module = _NORMS[value.dim()](mean.numel(), eps=eps, affine=True, device=mean.device,
                                 dtype=mean.dtype).eval()
    with torch.no_grad():
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)
        module.weight.copy_(weight if weight is not None else torch.ones_like(mean))
        module.bias.copy_(bias if bias is not None else torch.zeros_like(mean))
    return module


def functional_to_modules(gm: fx.GraphModule, values: dict[fx.Node, object]) -> int:
    """Replace the functional layers of the module docstring by modules (in place).

    ``values``: every node's value on one example (``_analysis.record``). Returns the number
    of nodes replaced.
    """
    for node in list(gm.graph.nodes):  # shape reads nobody uses (f-strings of proxies)
        if not node.users and ops.is_shape_read(node):
            gm.graph.erase_node(node)
    namer = _Namer(gm)
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not hashable(node.target):
            continue
        if node.target in _CONVS or node.target is F.linear:
            params = [_argument(node, 1, "weight"), _argument(node, 2, "bias")]
            if any(_depends_on_input(p) for p in params):
                continue
            module = _conv_module(node, values)
            owner = functional_producer_name(gm, node)
            owner = None if "@" in owner else owner
            kind = "linear" if node.target is F.linear else "conv"
            drop = _weight_nodes(node, ("weight", "bias"), 1)
        elif node.target is F.batch_norm:
            params = [_argument(node, i + 1, name) for i, name in enumerate(_NORM_ARGS[:4])]
            if any(_depends_on_input(p) for p in params):
                continue
            module = _norm_module(node, values)
            mean = params[0]
            owner = mean.target.rpartition(".")[0] if isinstance(mean, fx.Node) and (
                mean.op == "get_attr") else None
            kind, drop = "bn", _weight_nodes(node, _NORM_ARGS[:4], 1)
        else:
            continue
        if module is None:
            continue
        target = namer.target(owner, kind, drop | {node})
        _set_module(gm, target, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(target, (node.args[0],))
        new.meta = dict(node.meta)
        values[new] = values.get(node)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        _erase_unused(gm, drop)
        replaced += 1
    gm.graph.lint()
    gm.recompile()
    return replaced


def _erase_unused(gm: fx.GraphModule, nodes: set[fx.Node]) -> None:
    changed = True
    while changed:
        changed = False
        for node in list(nodes):
            if node.graph is gm.graph and not node.users and node.op != "output" and (
                    node.op in ("get_attr", "call_method") or node.op == "call_function"
                    and node.target is not operator.setitem):
                gm.graph.erase_node(node)
                nodes.discard(node)
                changed = True


def fold_linear_batchnorm(gm: fx.GraphModule) -> int:
    """Fold ``bn(y.flatten(0, k)).reshape_as(y)``, ``y = linear(x)``, into the linear layer
    (in place; see the module docstring). Returns the number folded."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for out in list(gm.graph.nodes):
        if not (out.op == "call_method" and out.target in ("reshape_as", "view_as")):
            continue
        norm, linear = out.args[0], out.args[1]
        if not (isinstance(norm, fx.Node) and norm.op == "call_module" and len(norm.users) == 1
                and isinstance(linear, fx.Node) and linear.op == "call_module"):
            continue
        flat = norm.args[0]
        bn, layer = gm.get_submodule(norm.target), gm.get_submodule(linear.target)
        if not (isinstance(flat, fx.Node) and flat.op == "call_method"
                and flat.target == "flatten" and flat.args[0] is linear
                and tuple(flat.args[1:]) == (0, 1) and len(flat.users) == 1
                and set(linear.users) == {flat, out} and calls[linear.target] == 1
                and calls[norm.target] == 1 and is_plain(layer, nn.Linear)
                and is_plain(bn, nn.BatchNorm1d) and bn.track_running_stats
                and bn.running_var is not None):
            continue
        scale, shift = batchnorm_affine(bn, torch.float64)
        fused = nn.Linear(layer.in_features, layer.out_features, device=layer.weight.device,
                          dtype=layer.weight.dtype)
        bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(
            shift)
        with torch.no_grad():
            fused.weight.copy_(layer.weight.detach().double() * scale[:, None])
            fused.bias.copy_(bias * scale + shift)
        _set_module(gm, linear.target, fused)
        out.replace_all_uses_with(linear)
        for node in (out, norm, flat):
            gm.graph.erase_node(node)
        folded += 1
    gm.graph.lint()
    gm.recompile()
    return folded
