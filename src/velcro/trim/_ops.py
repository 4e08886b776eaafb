"""How trimming sees each node of a traced graph: what it does to channels.

Every node gets one kind:

- ``producer``: a convolution (groups = 1) or linear module: output channels are its filters,
  each reading every input channel. Its constant input channels fold into its bias.
- ``channelwise``: output channel c depends on input channel c only (activations, batch-norm,
  pooling, dropout, a depthwise convolution, arithmetic with a Python number, a mean over the
  axes after the channel axis). A constant channel stays constant.
- ``sum``: ``a + b`` / ``a - b`` of two tensors of the same shape: channel c of the result is
  constant when it is constant in both.
- ``cat``: concatenation along the channel axis.
- ``flatten``: ``(N, C, *rest) -> (N, C * prod(rest))``: channel c becomes units.
- ``batch_size``: ``x.size(0)``, the one shape query a trimmed tensor answers unchanged.
- ``shape``: any other read of a tensor's shape, rank, dtype or device (``x.ndim``,
  ``x.shape``, ``x.size(d)``, ``x.dim()``, timm's ``torch._assert(x.ndim == 4)``): it reads no
  channel value, so it demands none; the original channel count is answered as a constant.
- ``grouped``: a convolution with 1 < groups < input channels: output channel c reads the
  input channels of its group only (``_grouped``).
- ``chanpad``: ``F.pad`` that adds constant channels before/after the channel axis (the
  CIFAR ResNets' option-A shortcut): a known placement, nothing computed (``_placement``).
- ``split`` / ``select``: ``torch.split``/``chunk`` along the channels read through
  ``getitem``, and ``x[:, a:b]``: a channel range of the input (``_placement``).
- ``opaque``: anything else. It gets the full tensor, constants placed, so that its result is
  exactly the original one (correct, but nothing is saved through it).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from velcro.graph._plain import hashable, is_plain

CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Modules without per-channel parameters whose output channel c depends only on input c:
# elementwise ones on any channel axis, spatial ones (pooling, resizing) when the channels
# come before the spatial axes.
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.Hardtanh, nn.Mish, nn.Softplus,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
)
SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d,
    nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
)
CHANNELWISE_MODULES = ELEMENTWISE_MODULES + SPATIAL_MODULES
ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.silu, F.gelu, F.hardswish,
    F.hardsigmoid, torch.sigmoid, torch.tanh, F.leaky_relu, F.elu, F.hardtanh, F.mish,
    F.softplus, F.dropout,
}
SPATIAL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
}
CHANNELWISE_FUNCTIONS = ELEMENTWISE_FUNCTIONS | SPATIAL_FUNCTIONS
CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}
REDUCE_METHODS = {"mean", "amax", "sum"}
SUM_FUNCTIONS = {operator.add: 1, operator.iadd: 1, torch.add: 1, operator.sub: -1,
                 operator.isub: -1, torch.sub: -1}
SUM_METHODS = {"add": 1, "add_": 1, "sub": -1, "sub_": -1}
# Arithmetic with a Python number is channelwise.
SCALAR_FUNCTIONS = set(SUM_FUNCTIONS) | {operator.mul, operator.imul, torch.mul,
                                         operator.truediv, operator.itruediv, torch.div}
SCALAR_METHODS = set(SUM_METHODS) | {"mul", "mul_", "div", "div_"}


def is_depthwise(module: nn.Module) -> bool:
    """A convolution whose every group reads one input channel."""
    return (is_plain(module, CONV_MODULES) and module.groups == module.in_channels
            and module.groups > 1)


def is_grouped(module: nn.Module) -> bool:
    """A convolution of several groups, each reading several input channels."""
    return is_plain(module, CONV_MODULES) and 1 < module.groups < module.in_channels


SHAPE_ATTRIBUTES = frozenset({"ndim", "shape", "dtype", "device", "is_cuda", "layout"})
SHAPE_METHODS = frozenset({"dim", "size", "get_device"})


def is_shape_read(node: fx.Node) -> bool:
    """``x.ndim``, ``x.shape``, ``x.size(d)``, ``x.dim()``, ...: reads no channel value."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        return node.args[1] in SHAPE_ATTRIBUTES
    return node.op == "call_method" and node.target in SHAPE_METHODS and len(
        node.all_input_nodes) == 1


def split_dim(node: fx.Node) -> int | None:
    """The axis of ``torch.split(x, sizes, dim)`` / ``x.chunk(n, dim)``, else None."""
    if node.op == "call_function" and hashable(node.target) and node.target in (
            torch.split, torch.chunk):
        pass
    elif not (node.op == "call_method" and node.target in ("split", "chunk")):
        return None
    if len(node.all_input_nodes) != 1:
        return None
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return dim if isinstance(dim, int) else None


def pad_amounts(node: fx.Node) -> tuple[int, ...] | None:
    """The ``pad`` tuple of an ``F.pad`` call in constant mode (or any mode when spatial)."""
    if not (node.op == "call_function" and node.target is F.pad) or len(
            node.all_input_nodes) != 1:
        return None
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    if not isinstance(pad, (tuple, list)) or len(pad) % 2 or not all(
            isinstance(p, int) for p in pad):
        return None
    return tuple(pad)


def pad_kind(node: fx.Node, channel_axis: int | None, ndim: int | None) -> str | None:
    """``channelwise`` for a spatial pad, ``chanpad`` for one that adds channels."""
    pad = pad_amounts(node)
    if pad is None or channel_axis != 1 or ndim is None:
        return None
    padded_axes = len(pad) // 2  # the last ones
    if padded_axes <= ndim - 2:
        return "channelwise"
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    channel = pad[2 * (ndim - 2): 2 * (ndim - 1)]
    batch = pad[2 * (ndim - 1):]
    if mode == "constant" and min(channel) >= 0 and not any(batch):
        return "chanpad"
    return None


def channel_range(node: fx.Node, channel_axis: int | None) -> tuple[int, int] | None:
    """``x[:, a:b]`` (later axes whole): the channel range (``b`` may be None), else None."""
    if not (node.op == "call_function" and node.target is operator.getitem) or (
            channel_axis != 1 or len(node.all_input_nodes) != 1):
        return None
    index = node.args[1]
    if not isinstance(index, tuple) or len(index) < 2 or index[0] != slice(None):
        return None
    chosen = index[1]
    if not isinstance(chosen, slice) or chosen.step not in (None, 1) or any(
            i not in (slice(None), Ellipsis) for i in index[2:]):
        return None
    if not all(v is None or isinstance(v, int) for v in (chosen.start, chosen.stop)):
        return None
    return chosen.start or 0, chosen.stop


def _spatial_slicing(node: fx.Node, channel_axis: int | None) -> bool:
    """``x[:, :, ::2, ::2]``: batch and channels whole, later axes sliced."""
    if not (node.op == "call_function" and node.target is operator.getitem) or (
            channel_axis != 1 or len(node.all_input_nodes) != 1):
        return False
    index = node.args[1]
    return (isinstance(index, tuple) and len(index) > 2 and index[0] == slice(None)
            and index[1] == slice(None) and all(isinstance(i, slice) for i in index[2:]))


def tensor_arg(node: fx.Node) -> fx.Node | None:
    """The one node a single-input op reads (its first argument for modules)."""
    inputs = node.all_input_nodes
    return inputs[0] if len(inputs) == 1 else None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sum_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, int] | None:
    """(a, b, sign) for ``a + b`` / ``a - b`` of two nodes, else None."""
    if node.op == "call_function" and hashable(node.target) and node.target in SUM_FUNCTIONS:
        sign = SUM_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in SUM_METHODS:
        sign = SUM_METHODS[node.target]
    else:
        return None
    if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        return a, b, sign
    return None


def sum_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, int]:
    operands = _sum_operands(node)
    assert operands is not None
    return operands


def _scalar_arithmetic(node: fx.Node) -> bool:
    if node.op == "call_function":
        known = hashable(node.target) and node.target in SCALAR_FUNCTIONS
    else:
        known = node.op == "call_method" and node.target in SCALAR_METHODS
    if not known or len(node.args) != 2 or node.kwargs:
        return False
    a, b = node.args
    return isinstance(a, fx.Node) and _is_number(b) or (
        isinstance(b, fx.Node) and _is_number(a) and node.target in
        (operator.add, operator.mul, torch.add, torch.mul))


def _reduces_after(node: fx.Node, channel_axis: int, ndim: int) -> bool:
    """``x.mean(dims)`` over axes after the channel axis (channel axis keeps its place)."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return False
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not all(isinstance(d, int) for d in dims):
        return False
    return all((d % ndim) > channel_axis for d in dims) and node.kwargs.get("dtype") is None


def _flatten_start(node: fx.Node, gm: fx.GraphModule) -> int | None:
    """The start_dim of a flatten that runs to the last axis, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if is_plain(module, nn.Flatten) and module.end_dim == -1:
            return module.start_dim
        return None
    if node.op == "call_function" and node.target is torch.flatten or (
            node.op == "call_method" and node.target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start if end == -1 and isinstance(start, int) else None
    if node.op == "call_method" and node.target in ("view", "reshape") and len(node.args) == 3:
        # x.view(x.size(0), -1)
        size, rest = node.args[1], node.args[2]
        if rest == -1 and isinstance(size, fx.Node) and classify_batch_size(size):
            return 1
    return None


def classify_batch_size(node: fx.Node) -> bool:
    """``x.size(0)`` (or ``x.shape[0]`` through getattr): the batch size."""
    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return dim == 0
    return False


def classify(gm: fx.GraphModule, node: fx.Node, channel_axis: int | None,
             ndim: int | None) -> str:
    """The kind of ``node`` (see the module docstring), given its first input's channel axis.

    ``channel_axis``/``ndim`` describe the node's first tensor argument when it is a tensor
    with a known channel axis (else None).
    """
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if is_plain(module, CONV_MODULES) and module.groups == 1 or is_plain(module, nn.Linear):
            return "producer"
        if channel_axis is None:
            return "opaque"
        if is_plain(module, ELEMENTWISE_MODULES) or channel_axis == 1 and (
                is_depthwise(module) or is_plain(module, BATCHNORM_MODULES + SPATIAL_MODULES)):
            return "channelwise"
        if channel_axis == 1 and is_grouped(module):
            return "grouped"
        if _flatten_start(node, gm) == channel_axis == 1:
            return "flatten"
        return "opaque"
    if node.op not in ("call_function", "call_method"):
        return "opaque"
    if classify_batch_size(node):
        return "batch_size"
    if channel_axis is not None and is_shape_read(node):
        return "shape"
    if channel_axis is not None and split_dim(node) is not None:
        return "split"
    if channel_axis is None and _sum_operands(node) is None and not _is_cat(node):
        return "opaque"
    if _sum_operands(node) is not None:
        return "sum"
    if _is_cat(node):
        return "cat"
    if _flatten_start(node, gm) is not None:
        return "flatten" if _flatten_start(node, gm) == channel_axis == 1 else "opaque"
    padding = pad_kind(node, channel_axis, ndim)
    if padding is not None:
        return padding
    if channel_range(node, channel_axis) is not None:
        return "select"
    if _spatial_slicing(node, channel_axis):
        return "channelwise"
    if node.op == "call_function" and hashable(node.target) and _only_first_is_node(node) and (
            node.target in ELEMENTWISE_FUNCTIONS
            or node.target in SPATIAL_FUNCTIONS and channel_axis == 1):
        return "channelwise"
    if node.op == "call_method" and node.target in CHANNELWISE_METHODS and _only_first_is_node(
            node):
        return "channelwise"
    if _scalar_arithmetic(node):
        return "channelwise"
    if (node.op == "call_method" and node.target in REDUCE_METHODS and ndim is not None
            and _only_first_is_node(node) and _reduces_after(node, channel_axis, ndim)):
        return "channelwise"
    return "opaque"


def _only_first_is_node(node: fx.Node) -> bool:
    """The node reads exactly one other node (its tensor); the rest are literals."""
    return len(node.all_input_nodes) == 1


def _is_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.cat, torch.concat) and bool(
        node.args) and isinstance(node.args[0], (list, tuple))


def cat_inputs(node: fx.Node) -> tuple[list, int]:
    """The tensors and the axis of a ``torch.cat``."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return list(node.args[0]), dim


def flatten_start(node: fx.Node, gm: fx.GraphModule) -> int | None:
    return _flatten_start(node, gm)
