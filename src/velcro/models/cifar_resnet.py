"""CIFAR ResNet-20/32/44/56 (He et al. 2015, section 4.2), the "option A" variant.

The module names match the checkpoints of akamaster/pytorch_resnet_cifar10 (``conv1``, ``bn1``,
``layer{1,2,3}.{i}.conv{1,2}`` / ``bn{1,2}``, ``linear``), so those files load unchanged. The
blocks are written in the style of torchvision's ``BasicBlock`` (one ``nn.ReLU`` module called
twice), so that ``torch.fx`` sees every activation as a module call with a readable name
(``layer2.0.relu:0``). The parameter-free "option A" shortcut (subsample, then zero channels on
both sides) is the :class:`PadShortcut` module.

These checkpoints predate batch norm's ``num_batches_tracked`` counter; :func:`load_weights`
leaves the model's counters as they are when a file has none, as ``load_state_dict`` does.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from velcro.data._preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

__all__ = [
    "CIFAR_PREPROCESS",
    "CifarBasicBlock",
    "CifarResNet",
    "PadShortcut",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
]


# What the checkpoints were trained on: RGB in [0, 1] normalised with ImageNet's mean and std,
# 32x32, no resize. CIFAR images are 32x32 already, so the crop leaves them as they are; it
# records the input size (and keeps larger images batchable).
CIFAR_PREPROCESS = Preprocess(resize=None, crop=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """The "option A" shortcut from ``planes // 2`` to ``planes`` channels, without parameters.

    Keeps every other pixel in both directions and adds ``pad = planes // 4`` zero channels
    before and after the input's channels.

    Args:
        planes: output channels (twice the input's).

    Example:
        >>> PadShortcut(32)(torch.ones(1, 16, 32, 32)).shape
        torch.Size([1, 32, 16, 16])
    """

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.planes = planes
        self.pad = planes // 4

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"planes={self.planes}, pad={self.pad}"


class CifarBasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity or "option A" shortcut.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first convolution (2 where a stage starts, except the first).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if stride != 2 or planes != 2 * in_planes:
                raise ValueError("the option A shortcut only halves the size and doubles width")
            self.shortcut = PadShortcut(planes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        out += self.shortcut(x)
        out = self.relu(out)
        return out


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6 * blocks + 2``: a 16-channel stem, stages of 16/32/64.

    Args:
        blocks: basic blocks per stage (3, 5, 7, 9 for depth 20, 32, 44, 56).
        num_classes: size of the ``linear`` head.

    Example:
        >>> model = CifarResNet(3).eval()
        >>> model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """

    def __init__(self, blocks: int, num_classes: int = 10) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"blocks per stage must be at least 1, got {blocks}")
        self.in_planes = 16
        self.conv1 = _conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, blocks, stride=1)
        self.layer2 = self._make_layer(32, blocks, stride=2)
        self.layer3 = self._make_layer(64, blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(64, num_classes)

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for index in range(blocks):
            layers.append(CifarBasicBlock(self.in_planes, planes, stride if index == 0 else 1))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.linear(x)


def _cifar_resnet(
    depth: int, weights: str | os.PathLike[str] | None, **kwargs: Any
) -> CifarResNet:
    model = CifarResNet((depth - 2) // 6, **kwargs)
    if weights is not None:
        from velcro.models._weights import load_weights

        load_weights(model, weights)
    return model


def cifar_resnet20(
    *, weights: str | os.PathLike[str] | None = None, **kwargs: Any
) -> CifarResNet:
    """ResNet-20 for 32x32 CIFAR images (0.27 M parameters).

    Args:
        weights: optional path of a ``.safetensors`` / ``.pt`` state dict to load, such as
            akamaster/pytorch_resnet_cifar10's ``resnet20`` checkpoint.
        **kwargs: passed to :class:`CifarResNet` (``num_classes``, default 10).

    Example:
        >>> model = cifar_resnet20(weights="cifar10/resnet20.safetensors").eval()
        >>> model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    return _cifar_resnet(20, weights, **kwargs)


def cifar_resnet32(
    *, weights: str | os.PathLike[str] | None = None, **kwargs: Any
) -> CifarResNet:
    """ResNet-32 for 32x32 CIFAR images (0.46 M parameters).

    Args:
        weights: optional path of a ``.safetensors`` / ``.pt`` state dict to load.
        **kwargs: passed to :class:`CifarResNet` (``num_classes``, default 10).

    Example:
        >>> len(cifar_resnet32().layer2)
        5
    """
    return _cifar_resnet(32, weights, **kwargs)


def cifar_resnet44(
    *, weights: str | os.PathLike[str] | None = None, **kwargs: Any
) -> CifarResNet:
    """ResNet-44 for 32x32 CIFAR images (0.66 M parameters).

    Args:
        weights: optional path of a ``.safetensors`` / ``.pt`` state dict to load.
        **kwargs: passed to :class:`CifarResNet` (``num_classes``, default 10).

    Example:
        >>> len(cifar_resnet44().layer3)
        7
    """
    return _cifar_resnet(44, weights, **kwargs)


def cifar_resnet56(
    *, weights: str | os.PathLike[str] | None = None, **kwargs: Any
) -> CifarResNet:
    """ResNet-56 for 32x32 CIFAR images (0.85 M parameters).

    Args:
        weights: optional path of a ``.safetensors`` / ``.pt`` state dict to load.
        **kwargs: passed to :class:`CifarResNet` (``num_classes``, default 10).

    Example:
        >>> model = cifar_resnet56(num_classes=100)
        >>> model.linear.out_features
        100
    """
    return _cifar_resnet(56, weights, **kwargs)
