"""A conv2d + activation that computes only the outputs an element plan leaves live.

An element (VELCRO) plan replaces scattered activation elements by constants; a dense
convolution still computes them, so the saving stays on paper. :class:`SkippingConv` is the
software counterpart of the papers' FPGA module: it computes each live output element as one
dot product (conv, folded eval batch-norm, optional residual addend, activation) and writes the
plan's constants everywhere else, so its work is proportional to ``1 - C``.

Two backends: ``numba`` (CPU, float32; a direct convolution over a list of live
(position, channel) pairs, see ``_skipconv``) and ``torch`` (any device or dtype; im2col once,
then per output channel one matrix product over its live columns: correct everywhere, but a
GEMV per channel, so slower than a dense convolution).

Example:
    >>> layer = SkippingConv(conv, plan.mask("relu"), plan.sites["relu"].constant, bn=bn)
    >>> y = layer(x)   # == the "relu" site's output in velcro.apply(model, plan)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from velcro._globals import torch_threads_kept
from velcro.errors import VelcroError
from velcro.graph.capture import recorded_example, trace
from velcro.graph.layers import SiteLayer, batchnorm_affine, site_layers
from velcro.hardware import _skipconv
from velcro.hardware._layer_io import LayerIO, layer_io
from velcro.plan import Plan

__all__ = ["BACKENDS", "ConvSite", "LayerIO", "SkippingConv", "activation_function", "conv_sites",
           "layer_io", "skip_conv2d"]

BACKENDS = ("auto", "numba", "torch")
# Output positions per tile of the numba kernel: a tile's input band (3 rows x 34 columns x
# 64 channels = 26 KiB for a 3x3 conv on a wide map) stays in L1 while the kernel walks the
# output channels, and 32 lanes leave enough live positions per channel to fill its 4-wide
# register blocks. Small maps fill a tile with several rows or images.
LANE_TILE = 32
# Output channels per parallel job (tiles x channel blocks jobs keep both threads busy even
# for the 1x1 maps of a network's last stage).
CHANNEL_BLOCK = 16


def _fold_batch_norm(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm | None):
    """Weight and bias of ``bn(conv(x))`` as one convolution (eval-mode batch-norm)."""
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(
        conv.out_channels, dtype=weight.dtype, device=weight.device)
    if bn is None:
        return weight.clone(), bias.clone()
    scale, shift = batchnorm_affine(bn)
    return weight * scale.view(-1, 1, 1, 1), bias * scale + shift


def _padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding, for int and string paddings."""
    if conv.padding_mode != "zeros":
        raise VelcroError(f"conv padding_mode '{conv.padding_mode}' is not supported by the "
                          "skipping kernel; use zero padding")
    if conv.padding == "valid":
        return 0, 0, 0, 0
    if conv.padding == "same":
        pads = []
        for size, dil in zip(conv.kernel_size[::-1], conv.dilation[::-1], strict=True):
            total = dil * (size - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    pad_h, pad_w = conv.padding
    return pad_w, pad_w, pad_h, pad_h


def activation_function(kind: str):
    """The torch function of an activation kind (``relu``, ``gelu_tanh``, ...).

    Example:
        >>> activation_function("relu")(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """
    table = {
        "identity": lambda v: v, "relu": F.relu, "relu6": F.relu6, "silu": F.silu,
        "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
        "hardswish": F.hardswish,
    }
    return table[kind]


class SkippingConv:
    """``act(bn(conv(x)) [+ residual])`` at live outputs, the plan's constants elsewhere.

    Args:
        conv: a ``nn.Conv2d`` (any stride, zero padding, dilation, groups).
        mask: bool tensor (out_channels, H_out, W_out), True where the output is a constant.
        constant: float tensor of the same shape; its values at masked positions are written.
        bn: an optional ``BatchNorm2d`` after the convolution, folded in (eval semantics).
        activation: one of ``_skipconv.ACTIVATIONS`` (``relu``, ``relu6``, ``silu``, ``gelu``,
            ``gelu_tanh``, ``hardswish``, ``identity``).
        backend: ``auto`` (numba for float32 CPU inputs, else torch), ``numba`` or ``torch``.

    Example:
        >>> mask = torch.rand(64, 64, 64) < 0.5
        >>> layer = SkippingConv(nn.Conv2d(64, 64, 3, padding=1), mask, torch.zeros(64, 64, 64))
        >>> layer(torch.randn(1, 64, 64, 64)).shape
        torch.Size([1, 64, 64, 64])
    """

    def __init__(self, conv: nn.Conv2d, mask: torch.Tensor, constant: torch.Tensor, *,
                 bn: nn.Module | None = None, activation: str = "relu",
                 backend: str = "auto") -> None:
        if not isinstance(conv, nn.Conv2d):
            raise VelcroError(f"the skipping kernel takes an nn.Conv2d, not "
                              f"{type(conv).__name__}")
        if activation not in _skipconv.ACTIVATIONS:
            raise VelcroError(f"activation '{activation}' is unknown; use one of "
                              + ", ".join(_skipconv.ACTIVATIONS))
        if backend not in BACKENDS:
            raise VelcroError(f"backend '{backend}' is unknown; use one of {', '.join(BACKENDS)}")
        if mask.dim() != 3 or mask.shape[0] != conv.out_channels:
            raise VelcroError(f"mask of shape {tuple(mask.shape)} does not fit a conv with "
                              f"{conv.out_channels} output channels; give (C_out, H_out, W_out)")
        if constant.shape != mask.shape:
            raise VelcroError(f"constant of shape {tuple(constant.shape)} differs from the "
                              f"mask's {tuple(mask.shape)}; give one value per output element")
        self.conv, self.activation, self.backend = conv, activation, backend
        self.out_shape = tuple(mask.shape)
        self.weight, self.bias = _fold_batch_norm(conv, bn)
        self.padding = _padding(conv)
        # (C_out, kh, kw * C_in / groups): a filter row is one contiguous run per tap row.
        self.weight_rows = self.weight.float().permute(0, 2, 3, 1).flatten(2).contiguous().cpu()
        self.bias_f32 = self.bias.float().contiguous().cpu()
        # Where each output position's window starts in the padded channels-last input:
        # its first input row and its offset in that (flattened) row.
        positions = torch.arange(self.out_shape[1] * self.out_shape[2])
        out_w = self.out_shape[2]
        self._windows = ((positions // out_w * conv.stride[0]).to(torch.int32),
                         (positions % out_w * conv.stride[1] * conv.in_channels).to(torch.int32))
        self._set_mask(mask, constant)

    def _set_mask(self, mask: torch.Tensor, constant: torch.Tensor) -> None:
        self.mask = mask.to(torch.bool).cpu()
        live = ~self.mask.reshape(mask.shape[0], -1)
        # Constants where compressed, zero elsewhere (the live values overwrite them).
        self.constant = torch.where(self.mask, constant.detach().cpu(), 0.0).reshape(live.shape)
        self.live = live
        self.live_channels = [row.nonzero().flatten() for row in live]  # torch backend
        self._lists: dict[tuple, tuple] = {}  # (batch, tile) -> the numba kernel's work list

    def work_list(self, images: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The numba kernel's (pointers, lane images, lane positions, tiles) for a batch.

        Lanes ``q = n * L + l`` number the batch's output positions; for each (tile of
        ``LANE_TILE`` lanes, output channel) the CSR lists the live lanes as (image n,
        position l). Built once per batch size.
        """
        key = (images, LANE_TILE)
        if key not in self._lists:
            self._lists[key] = _skipconv.live_lists(self.live, images, LANE_TILE)
        return self._lists[key]

    def with_mask(self, mask: torch.Tensor, constant: torch.Tensor | None = None) -> SkippingConv:
        """The same layer (weights folded once) with another mask and constants.

        Example:
            >>> everything = layer.with_mask(torch.zeros_like(layer.mask))  # C = 0
        """
        if tuple(mask.shape) != self.out_shape:
            raise VelcroError(f"mask of shape {tuple(mask.shape)} should be {self.out_shape}")
        other = copy.copy(self)
        other._set_mask(mask, constant if constant is not None else torch.zeros(self.out_shape))
        return other

    @property
    def live_outputs(self) -> int:
        """Output elements computed per image."""
        return int(self.live.sum())

    @property
    def saving_ratio(self) -> float:
        """The fraction of output elements not computed (the layer's C)."""
        return 1.0 - self.live_outputs / self.mask.numel()

    def _uses_numba(self, x: torch.Tensor) -> bool:
        fits = x.device.type == "cpu" and x.dtype == torch.float32 and _skipconv.available()
        if self.backend == "numba" and not fits:
            raise VelcroError("backend 'numba' needs numba and a float32 CPU input; use "
                              "backend='torch' or 'auto'")
        return self.backend == "numba" or (self.backend == "auto" and fits)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the layer for a batch ``x`` (N, C_in, H, W); ``residual`` is (N, *mask)."""
        expected = (x.shape[0], *self.out_shape)
        if residual is not None and tuple(residual.shape) != expected:
            raise VelcroError(f"residual of shape {tuple(residual.shape)} should be {expected}")
        left, right, top, bottom = self.padding
        out_size = (_out_size(x.shape[-2] + top + bottom, self.conv, 0),
                    _out_size(x.shape[-1] + left + right, self.conv, 1)) if x.dim() == 4 else ()
        if x.dim() != 4 or x.shape[1] != self.conv.in_channels or out_size != self.out_shape[1:]:
            raise VelcroError(f"input of shape {tuple(x.shape)} does not fit: the layer takes "
                              f"(N, {self.conv.in_channels}, H, W) giving outputs of the "
                              f"mask's spatial shape {self.out_shape[1:]}")
        with torch.no_grad():
            if self._uses_numba(x):
                with torch_threads_kept():  # numba's OpenMP start-up resets torch's count
                    out = self._numba(x, residual)
            else:
                out = self._torch(x, residual)
        return out

    def _numba(self, x, residual):
        conv = self.conv
        left, right, top, bottom = self.padding
        images, channels, height, width = x.shape
        padded = torch.empty(images, height + top + bottom, (width + left + right) * channels)
        _skipconv.pad_channels_last(x.contiguous().numpy(), padded.numpy(), top, left)
        out = self.constant.float().expand(x.shape[0], -1, -1).contiguous()
        has_residual = residual is not None
        extra = (residual.float().contiguous().reshape(out.shape) if has_residual
                 else out[:0])
        pointers, lane_images, lane_positions, tiles = self.work_list(x.shape[0])
        first_rows, row_offsets = self._windows
        _skipconv.skip_conv_live(
            padded.numpy(), self.weight_rows.numpy(), self.bias_f32.numpy(),
            pointers.numpy(), lane_images.numpy(), lane_positions.numpy(), first_rows.numpy(),
            row_offsets.numpy(), extra.numpy(), has_residual,
            _skipconv.ACTIVATIONS[self.activation], out.numpy(), conv.in_channels,
            conv.in_channels // conv.groups, conv.dilation[0], conv.dilation[1], tiles,
            conv.out_channels // conv.groups, CHANNEL_BLOCK)
        return out.view(x.shape[0], *self.out_shape)

    def _torch(self, x, residual):
        conv = self.conv
        columns = F.unfold(F.pad(x, self.padding), conv.kernel_size, conv.dilation, 0,
                           conv.stride)  # (N, C_in * kh * kw, L)
        images = x.shape[0]
        out = self.constant.to(x.device, x.dtype).expand(images, -1, -1).contiguous()
        weight = self.weight.to(x.device, x.dtype).flatten(1)
        bias = self.bias.to(x.device, x.dtype)
        depth = weight.shape[1]
        per_group = conv.out_channels // conv.groups
        act = activation_function(self.activation)
        flat_residual = residual.reshape(out.shape) if residual is not None else None
        for channel, positions in enumerate(self.live_channels):
            if positions.numel() == 0:
                continue
            positions = positions.to(x.device)
            group = channel // per_group
            live_columns = columns[:, group * depth:(group + 1) * depth, positions]
            values = torch.matmul(weight[channel], live_columns) + bias[channel]
            if flat_residual is not None:
                values = values + flat_residual[:, channel, positions]
            out[:, channel, positions] = act(values)
        return out.view(images, *self.out_shape)


def _out_size(padded: int, conv: nn.Conv2d, axis: int) -> int:
    span = conv.dilation[axis] * (conv.kernel_size[axis] - 1) + 1
    return (padded - span) // conv.stride[axis] + 1 if padded >= span else 0


def skip_conv2d(x: torch.Tensor, conv: nn.Conv2d, mask: torch.Tensor, constant: torch.Tensor,
                *, bn: nn.Module | None = None, activation: str = "relu",
                residual: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """One call of :class:`SkippingConv` (which prepares the live lists once; reuse it).

    Args:
        x: input batch (N, C_in, H, W).
        conv, mask, constant, bn, activation, backend: as for :class:`SkippingConv`.
        residual: an addend (N, C_out, H_out, W_out) before the activation, if any.

    Example:
        >>> y = skip_conv2d(x, conv, plan.mask("relu"), plan.sites["relu"].constant)
    """
    layer = SkippingConv(conv, mask, constant, bn=bn, activation=activation, backend=backend)
    return layer(x, residual)


@dataclass
class ConvSite:
    """A plan's site that :class:`SkippingConv` can compute, with the graph nodes it needs.

    Attributes:
        layer: the site's producer, batch-norm, residual and activation nodes.
        kernel: the prepared skipping layer (mask and constants from the plan).

    Example:
        >>> sites = conv_sites(model, plan)
        >>> output = sites["layer1.0.relu:0"].kernel(x)
    """

    layer: SiteLayer
    kernel: SkippingConv


def conv_sites(model: nn.Module, plan: Plan, *, backend: str = "auto") -> dict[str, ConvSite]:
    """Skipping kernels for the plan's sites fed by an ``nn.Conv2d`` (others are left out).

    Args:
        model: the model the plan was made for.
        plan: an element (or channel) :class:`Plan`.
        backend: as for :class:`SkippingConv`.

    Example:
        >>> kernels = conv_sites(model, plan)
        >>> sorted(kernels)[:2]
        ['layer1.0.relu:0', 'layer1.0.relu:1']
    """
    affine = [name for name, site in plan.sites.items() if site.coefficients is not None]
    if affine:
        raise VelcroError(
            f"site '{affine[0]}' of this plan is predicted from its kept channels (an affine "
            "plan); the skipping kernels emit constants only: trim the model (velcro.trim) "
            "or make the plan with constant='map'"
        )
    gm = trace(model, recorded_example(model, plan.info))
    result = {}
    for name, layer in site_layers(gm).items():
        if name not in plan.sites:
            continue
        producer = gm.get_submodule(_target(gm, layer.producer))
        if not isinstance(producer, nn.Conv2d) or len(plan.sites[name].shape) != 3:
            continue
        bn = gm.get_submodule(_target(gm, layer.batch_norm)) if layer.batch_norm else None
        kernel = SkippingConv(producer, plan.mask(name), plan.sites[name].constant, bn=bn,
                              activation=layer.kind, backend=backend)
        result[name] = ConvSite(layer, kernel)
    return result


def _target(gm: fx.GraphModule, node_name: str) -> str:
    for node in gm.graph.nodes:
        if node.name == node_name:
            if node.op != "call_module":
                return ""
            return node.target
    raise KeyError(node_name)
