"""Small models of each topology the library must handle, shared by the tests."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Chain(nn.Module):
    """conv-bn-relu x3 -> pool -> linear-relu -> linear."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(12)
        self.act2 = nn.ReLU6()
        self.conv3 = nn.Conv2d(12, 16, 3, padding=0)
        self.act3 = nn.SiLU()
        self.fc1 = nn.Linear(16, 10)
        self.fc2 = nn.Linear(10, classes)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.conv3(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


class Residual(nn.Module):
    """A ResNet-style block whose ReLU module is called twice, and a strided shortcut."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.relu(self.stem(x))
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        x = self.relu(out)
        out = self.bn3(self.conv3(x)) + self.down(x)
        x = torch.relu(out)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))


class Concat(nn.Module):
    """An inception-style block: four branches, one through max-pool, concatenated."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b2a = nn.Conv2d(8, 4, 1)
        self.b2b = nn.Conv2d(4, 6, 3, padding=1)
        self.b3 = nn.Conv2d(8, 3, 5, padding=2)
        self.b4 = nn.Conv2d(8, 5, 1)
        self.head = nn.Conv2d(18, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = F.relu(self.stem(x), inplace=True)
        y1 = F.relu(self.b1(x))
        y2 = F.relu(self.b2b(F.relu(self.b2a(x))))
        y3 = F.relu(self.b3(x))
        y4 = F.relu(self.b4(F.max_pool2d(x, 3, stride=1, padding=1)))
        x = torch.cat([y1, y2, y3, y4], 1)
        x = F.relu(self.head(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Depthwise(nn.Module):
    """A MobileNet-V2-style inverted residual: expand, depthwise, project, add."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU6(inplace=True))
        self.expand = nn.Sequential(nn.Conv2d(8, 24, 1, bias=False), nn.BatchNorm2d(24),
                                    nn.ReLU6(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False),
                                nn.BatchNorm2d(24), nn.ReLU6(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.last = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.Hardswish())
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        x = self.last(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))


class Misaligned(nn.Module):
    """A residual sum whose sides compute different channels, and a transposed output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        a = F.relu(self.a(x))
        b = F.relu(self.b(x))
        s = F.relu(self.c(a) + b)
        return (s - a).transpose(1, 3).flatten(1)


class MLP(nn.Module):
    """Linear layers only, with GELU and ReLU activations."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(32, 24)
        self.fc3 = nn.Linear(24, classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(self.act(self.fc1(x)))))


TOPOLOGIES = {
    "chain": (Chain, (3, 12, 12)),
    "residual": (Residual, (3, 12, 12)),
    "concat": (Concat, (3, 10, 10)),
    "depthwise": (Depthwise, (3, 10, 10)),
    "mlp": (MLP, (12,)),
}


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give batch-norm layers non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """A seeded, eval-mode instance of a zoo model and its per-image input shape."""
    cls, shape = TOPOLOGIES[name]
    torch.manual_seed(seed)
    return randomize_batchnorm(cls(), seed).eval(), shape


def images(shape: tuple[int, ...], count: int, seed: int = 0, batch: int = 8) -> list:
    """Deterministic random image batches."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(count, *shape, generator=gen)
    return [data[i : i + batch] for i in range(0, count, batch)]


def random_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Random weights that keep activations of order one through the whole network."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, value in model.state_dict().items():
        noise = torch.randn(value.shape, generator=gen) if value.is_floating_point() else None
        if noise is None:
            state[key] = value
        elif key.endswith("running_var"):
            state[key] = 0.5 + noise.abs()
        elif key.endswith("weight") and value.dim() == 1:  # batch-norm scale
            state[key] = 1.0 + 0.1 * noise
        elif key.endswith("weight"):  # He initialisation
            state[key] = noise * math.sqrt(2.0 / value[0].numel())
        else:
            state[key] = 0.1 * noise
    return state
