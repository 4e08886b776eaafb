"""Small hand-built modules with the patterns of models nobody here wrote (timm, torchvision,
user code), for the capture, site and trimming tests. No timm import: each pattern is a
local re-implementation of what those libraries do."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class BatchNormAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: a batch-norm subclass with its own forward (functional
    batch-norm on its buffers, a shape assert, then dropout and an activation)."""

    def __init__(self, channels: int, act: type = nn.ReLU) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = act()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, 0.1, self.eps)
        return self.act(self.drop(x))


class ConvSame(nn.Conv2d):
    """timm's ``Conv2dSame``: TensorFlow "same" padding computed from the input size."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        pads = []
        for size, k, s in ((iw, self.kernel_size[1], self.stride[1]),
                           (ih, self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ScaledStdConv(nn.Conv2d):
    """timm's ``ScaledStdConv2d``: the weight standardised in the forward, then F.conv2d."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight * self.gain, self.bias, self.stride, self.padding)


class TimmBlocks(nn.Module):
    """Fused batch-norm-activation, TF padding, weight standardisation, a shape assert, a
    grouped convolution and a functional linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvSame(3, 16, 3, stride=2, bias=False)
        self.bn1 = BatchNormAct(16)
        self.conv2 = nn.Conv2d(16, 24, 1, bias=False)
        self.bn2 = BatchNormAct(24, nn.LeakyReLU)
        self.grouped = nn.Conv2d(24, 24, 3, padding=1, groups=3, bias=False)
        self.bn3 = BatchNormAct(24, nn.SiLU)
        self.std = ScaledStdConv(24, 16, 1)
        self.head_weight = nn.Parameter(torch.randn(5, 16) * 0.3)

    def forward(self, x):
        x = self.bn1(self.stem(x))
        x = self.bn2(self.conv2(x))
        x = self.bn3(self.grouped(x))
        x = F.relu(self.std(x))
        torch._assert(x.shape[1] == 16, "16 channels")
        return F.linear(x.mean((2, 3)), self.head_weight)


class Grouped(nn.Module):
    """A ResNeXt bottleneck: 1x1, grouped 3x3 (4 groups), 1x1, residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 32, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        x = F.relu(self.bn3(self.conv3(out)) + x)
        return self.fc(x.mean((2, 3)))


class PreActivation(nn.Module):
    """Pre-activation: group-norm and batch-norm before the activations (ResNetV2)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, 16)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return self.fc(out.mean((2, 3)))


class ShapeReads(nn.Module):
    """Shape reads, asserts and Python control flow on shapes (vgg's ConvMlp, mobilevit)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        torch._assert(x.ndim == 4, "4-D")
        if x.shape[-1] < 8:  # control flow on a shape: needs a capture at one size
            x = F.interpolate(x, size=(8, 8))
        batch, channels, height, width = x.shape
        y = F.relu(self.conv2(x)).mean((2, 3)) * (width / height)
        return self.fc(y + 0.01 * x.size(1))


class PadShortcut(nn.Module):
    """The CIFAR ResNets' option-A shortcut: stride-2 subsampling, zero channels padded."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))  # TF-style explicit pad before a conv
        self.conv3 = nn.Conv2d(16, 8, 3, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        x = F.relu(out + shortcut)
        x = F.relu(self.conv3(self.pad(x)))
        return self.fc(x.mean((2, 3)))


class Ghost(nn.Module):
    """GhostNet's module: a cheap depthwise conv of the primary features, concatenated with
    them and cut to size; a MixNet-style split of the channels into two convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.primary = nn.Conv2d(3, 8, 1)
        self.cheap = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.mix_a = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.mix_b = nn.Conv2d(6, 6, 5, padding=2, groups=6)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        a = F.relu(self.primary(x))
        b = F.relu(self.cheap(a))
        x = torch.cat([a, b], 1)[:, :12]
        left, right = torch.split(x, [6, 6], dim=1)
        x = torch.cat([F.relu6(self.mix_a(left)), F.relu6(self.mix_b(right))], 1)
        return self.fc(x.mean((2, 3)))


class ScaledConv(nn.Conv2d):
    """A subclass with its own forward: trimming must not treat it as a Conv2d."""

    def forward(self, x):
        return super().forward(x) * 2.0 + 1.0


class ShiftedReLU(nn.ReLU):
    """A subclass with its own forward: not a relu."""

    def forward(self, x):
        return F.relu(x - 0.5)


class Subclasses(nn.Module):
    """Module subclasses with their own forward next to plain layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.scaled = ScaledConv(8, 8, 3, padding=1)
        self.bnact = BatchNormAct(8)
        self.act = ShiftedReLU()
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.act(self.bnact(self.scaled(x)))
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))


class LinearNorm(nn.Module):
    """LeViT's ``LinearNorm``: a batch-norm over tokens' channels through reshapes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.linear = nn.Linear(8, 12)
        self.bn = nn.BatchNorm1d(12)
        self.act = nn.Hardswish()
        self.proj = nn.Linear(12, 4)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        y = self.linear(tokens)
        y = self.act(self.bn(y.flatten(0, 1)).reshape_as(y))
        return self.proj(y).mean(1)


class SharedWeight(nn.Module):
    """A convolution called as a module whose weight is also read directly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        side = F.conv2d(x, self.conv.weight, padding=1).mean((1, 2, 3), keepdim=True)
        return self.conv2(y).mean((2, 3)) + side.flatten(1)


PATTERNS = {
    "timm_blocks": (TimmBlocks, (3, 12, 12)),
    "grouped": (Grouped, (3, 8, 8)),
    "pre_activation": (PreActivation, (3, 8, 8)),
    "shape_reads": (ShapeReads, (3, 6, 6)),
    "pad_shortcut": (PadShortcut, (3, 8, 8)),
    "ghost": (Ghost, (3, 8, 8)),
    "subclasses": (Subclasses, (3, 8, 8)),
    "linear_norm": (LinearNorm, (3, 8, 8)),
    "shared_weight": (SharedWeight, (3, 8, 8)),
}


def build_pattern(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """A pattern model in eval mode with random, non-trivial batch-norm statistics."""
    from zoo import randomize_batchnorm

    cls, shape = PATTERNS[name]
    torch.manual_seed(seed)
    model = randomize_batchnorm(cls(), seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
            if isinstance(module, ScaledStdConv):
                module.gain.uniform_(0.5, 1.5)
    return model.eval(), shape
