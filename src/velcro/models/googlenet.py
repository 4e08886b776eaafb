"""GoogLeNet (Inception v1), module for module the same as torchvision 0.28's ``googlenet``.

Differences from torchvision, none of which changes keys or numerics:

* the forward has no ``torch.jit.is_scripting()`` branch, so ``torch.fx.symbolic_trace`` of an
  eval-mode model works (``self.training`` and ``self.aux1 is not None`` are plain Python
  values at trace time) and the eval-mode forward always returns a plain ``Tensor``;
* ``init_weights=None`` means ``True`` without torchvision's warning.

In training mode with ``aux_logits=True`` the forward returns ``GoogLeNetOutputs`` exactly as
torchvision's does, including its field order: ``(logits, aux_logits2, aux_logits1)`` where
``aux_logits2`` holds the output of ``aux1`` and ``aux_logits1`` that of ``aux2``.
"""

from __future__ import annotations

import os
from collections import namedtuple
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BasicConv2d", "GoogLeNet", "GoogLeNetOutputs", "Inception", "InceptionAux", "googlenet"]

GoogLeNetOutputs = namedtuple("GoogLeNetOutputs", ["logits", "aux_logits2", "aux_logits1"])
GoogLeNetOutputs.__annotations__ = {
    "logits": Tensor,
    "aux_logits2": Tensor | None,
    "aux_logits1": Tensor | None,
}


class BasicConv2d(nn.Module):
    """Bias-free conv, BatchNorm (eps 1e-3) and a functional in-place ReLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        **kwargs: passed to ``nn.Conv2d`` (``kernel_size``, ``stride``, ``padding``).

    Example:
        >>> BasicConv2d(3, 8, kernel_size=3, padding=1)(torch.zeros(1, 3, 8, 8)).shape
        torch.Size([1, 8, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        x = self.bn(x)
        return F.relu(x, inplace=True)


class Inception(nn.Module):
    """Four parallel branches (1x1; 1x1-3x3; 1x1-3x3; maxpool-1x1) concatenated on channels.

    As in torchvision (and its published weights), ``branch3`` uses a 3x3 convolution where the
    paper has 5x5.

    Args:
        in_channels: input channels.
        ch1x1: channels of branch 1.
        ch3x3red: reduction channels of branch 2.
        ch3x3: output channels of branch 2.
        ch5x5red: reduction channels of branch 3.
        ch5x5: output channels of branch 3.
        pool_proj: output channels of branch 4.
        conv_block: conv block factory (default :class:`BasicConv2d`).

    Example:
        >>> block = Inception(192, 64, 96, 128, 16, 32, 32)
        >>> block(torch.zeros(1, 192, 28, 28)).shape
        torch.Size([1, 256, 28, 28])
    """

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        conv_block: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if conv_block is None:
            conv_block = BasicConv2d
        self.branch1 = conv_block(in_channels, ch1x1, kernel_size=1)

        self.branch2 = nn.Sequential(
            conv_block(in_channels, ch3x3red, kernel_size=1),
            conv_block(ch3x3red, ch3x3, kernel_size=3, padding=1),
        )

        self.branch3 = nn.Sequential(
            conv_block(in_channels, ch5x5red, kernel_size=1),
            # Here, kernel_size=3 instead of kernel_size=5 is a known bug.
            # Please see https://github.com/pytorch/vision/issues/906 for details.
            conv_block(ch5x5red, ch5x5, kernel_size=3, padding=1),
        )

        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            conv_block(in_channels, pool_proj, kernel_size=1),
        )

    def _forward(self, x: Tensor) -> list[Tensor]:
        branch1 = self.branch1(x)
        branch2 = self.branch2(x)
        branch3 = self.branch3(x)
        branch4 = self.branch4(x)

        outputs = [branch1, branch2, branch3, branch4]
        return outputs

    def forward(self, x: Tensor) -> Tensor:
        outputs = self._forward(x)
        return torch.cat(outputs, 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier (used in training only).

    Args:
        in_channels: input channels.
        num_classes: number of classes.
        conv_block: conv block factory (default :class:`BasicConv2d`).
        dropout: dropout probability before ``fc2``.

    Example:
        >>> InceptionAux(512, 10).eval()(torch.zeros(1, 512, 14, 14)).shape
        torch.Size([1, 10])
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        conv_block: Callable[..., nn.Module] | None = None,
        dropout: float = 0.7,
    ) -> None:
        super().__init__()
        if conv_block is None:
            conv_block = BasicConv2d
        self.conv = conv_block(in_channels, 128, kernel_size=1)

        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: Tensor) -> Tensor:
        # aux1: N x 512 x 14 x 14, aux2: N x 528 x 14 x 14
        x = F.adaptive_avg_pool2d(x, (4, 4))
        # aux1: N x 512 x 4 x 4, aux2: N x 528 x 4 x 4
        x = self.conv(x)
        # N x 128 x 4 x 4
        x = torch.flatten(x, 1)
        # N x 2048
        x = F.relu(self.fc1(x), inplace=True)
        # N x 1024
        x = self.dropout(x)
        # N x 1024
        x = self.fc2(x)
        # N x 1000 (num_classes)

        return x


class GoogLeNet(nn.Module):
    """GoogLeNet (torchvision layout).

    Args:
        num_classes: size of the ``fc`` head (and of the aux heads).
        aux_logits: build the auxiliary heads ``aux1``/``aux2`` (needed to load a checkpoint that
            has their keys with ``strict=True``; :func:`velcro.models.load_weights` drops them
            for a model without aux heads).
        transform_input: re-normalise an ImageNet-normalised input to the [-1, 1] scaling the
            published torchvision weights were trained with.
        init_weights: truncated-normal init of conv/linear weights (``None`` means ``True``).
        blocks: ``[conv_block, inception_block, inception_aux_block]`` factories.
        dropout: dropout probability before ``fc``.
        dropout_aux: dropout probability inside the aux heads.

    Example:
        >>> model = GoogLeNet(num_classes=10, aux_logits=False).eval()
        >>> model(torch.zeros(1, 3, 224, 224)).shape
        torch.Size([1, 10])
    """

    __constants__ = ["aux_logits", "transform_input"]

    def __init__(
        self,
        num_classes: int = 1000,
        aux_logits: bool = True,
        transform_input: bool = False,
        init_weights: bool | None = None,
        blocks: list[Callable[..., nn.Module]] | None = None,
        dropout: float = 0.2,
        dropout_aux: float = 0.7,
    ) -> None:
        super().__init__()
        if blocks is None:
            blocks = [BasicConv2d, Inception, InceptionAux]
        if init_weights is None:
            init_weights = True
        if len(blocks) != 3:
            raise ValueError(f"blocks length should be 3 instead of {len(blocks)}")
        conv_block = blocks[0]
        inception_block = blocks[1]
        inception_aux_block = blocks[2]

        self.aux_logits = aux_logits
        self.transform_input = transform_input

        self.conv1 = conv_block(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = conv_block(64, 64, kernel_size=1)
        self.conv3 = conv_block(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception3a = inception_block(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = inception_block(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception4a = inception_block(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = inception_block(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = inception_block(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = inception_block(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = inception_block(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)

        self.inception5a = inception_block(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = inception_block(832, 384, 192, 384, 48, 128, 128)

        self.aux1: nn.Module | None
        self.aux2: nn.Module | None
        if aux_logits:
            self.aux1 = inception_aux_block(512, num_classes, dropout=dropout_aux)
            self.aux2 = inception_aux_block(528, num_classes, dropout=dropout_aux)
        else:
            self.aux1 = None
            self.aux2 = None

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)

        if init_weights:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    torch.nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

    @property
    def ignored_weight_prefixes(self) -> tuple[str, ...]:
        """Key prefixes :func:`velcro.models.load_weights` skips: aux heads this model lacks."""
        return ("aux1.", "aux2.") if self.aux1 is None and self.aux2 is None else ()

    def _transform_input(self, x: Tensor) -> Tensor:
        if self.transform_input:
            x_ch0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
            x_ch1 = torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
            x_ch2 = torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
            x = torch.cat((x_ch0, x_ch1, x_ch2), 1)
        return x

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        # N x 3 x 224 x 224
        x = self.conv1(x)
        # N x 64 x 112 x 112
        x = self.maxpool1(x)
        # N x 64 x 56 x 56
        x = self.conv2(x)
        # N x 64 x 56 x 56
        x = self.conv3(x)
        # N x 192 x 56 x 56
        x = self.maxpool2(x)

        # N x 192 x 28 x 28
        x = self.inception3a(x)
        # N x 256 x 28 x 28
        x = self.inception3b(x)
        # N x 480 x 28 x 28
        x = self.maxpool3(x)
        # N x 480 x 14 x 14
        x = self.inception4a(x)
        # N x 512 x 14 x 14
        aux1: Tensor | None = None
        if self.aux1 is not None and self.training:
            aux1 = self.aux1(x)

        x = self.inception4b(x)
        # N x 512 x 14 x 14
        x = self.inception4c(x)
        # N x 512 x 14 x 14
        x = self.inception4d(x)
        # N x 528 x 14 x 14
        aux2: Tensor | None = None
        if self.aux2 is not None and self.training:
            aux2 = self.aux2(x)

        x = self.inception4e(x)
        # N x 832 x 14 x 14
        x = self.maxpool4(x)
        # N x 832 x 7 x 7
        x = self.inception5a(x)
        # N x 832 x 7 x 7
        x = self.inception5b(x)
        # N x 1024 x 7 x 7

        x = self.avgpool(x)
        # N x 1024 x 1 x 1
        x = torch.flatten(x, 1)
        # N x 1024
        x = self.dropout(x)
        x = self.fc(x)
        # N x 1000 (num_classes)
        return x, aux2, aux1

    def forward(self, x: Tensor) -> Tensor | GoogLeNetOutputs:
        x = self._transform_input(x)
        # torchvision unpacks (x, aux2, aux1) as (x, aux1, aux2): keep its output order.
        x, aux1, aux2 = self._forward(x)
        if self.training and self.aux_logits:
            return GoogLeNetOutputs(x, aux2, aux1)
        return x


def googlenet(*, weights: str | os.PathLike[str] | None = None, **kwargs: Any) -> GoogLeNet:
    """GoogLeNet, the same modules and keys as ``torchvision.models.googlenet``.

    Without ``weights`` the defaults are those of the class (``aux_logits=True``,
    ``transform_input=False``). With ``weights``, as torchvision's builder does with its
    pretrained weights, the defaults become ``aux_logits=False`` (the file's ``aux1.*`` /
    ``aux2.*`` keys are dropped) and ``transform_input=True``; pass them to override.

    Args:
        weights: optional path of a ``.safetensors`` / ``.pt`` state dict to load.
        **kwargs: passed to :class:`GoogLeNet` (``num_classes``, ``aux_logits``,
            ``transform_input``, ...).

    Example:
        >>> model = googlenet(aux_logits=False).eval()
        >>> model(torch.zeros(1, 3, 224, 224)).shape
        torch.Size([1, 1000])
    """
    if weights is not None:
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("transform_input", True)
        kwargs.setdefault("init_weights", False)
    model = GoogLeNet(**kwargs)
    if weights is not None:
        from velcro.models._weights import load_weights

        load_weights(model, weights)
    return model
