"""Model definitions compatible with torchvision checkpoints, and a small registry.

``resnet18``, ``mobilenet_v2`` and ``googlenet`` have the modules, ``state_dict`` keys, numerics
and ``torch.fx`` graphs of torchvision 0.28's models of the same names, without needing
torchvision.

Example:
    >>> from velcro import models
    >>> model = models.create("resnet18", num_classes=10)
    >>> "googlenet" in models.available()
    True
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from velcro.errors import VelcroError
from velcro.models._weights import load_weights, read_state_dict
from velcro.models.googlenet import GoogLeNet, googlenet
from velcro.models.mobilenetv2 import MobileNetV2, mobilenet_v2
from velcro.models.resnet import ResNet, resnet18, resnet34, resnet50

__all__ = [
    "GoogLeNet",
    "MobileNetV2",
    "ResNet",
    "available",
    "create",
    "googlenet",
    "load_weights",
    "mobilenet_v2",
    "read_state_dict",
    "register",
    "resnet18",
    "resnet34",
    "resnet50",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register(name: str) -> Callable[[F], F]:
    """Decorator that registers a model builder under ``name`` for :func:`create`.

    The builder is called as ``builder(num_classes=..., weights=..., **kwargs)``.

    Args:
        name: registry name; must not be taken already.

    Example:
        >>> @register("resnet18_zero_init")
        ... def resnet18_zero_init(*, weights=None, **kwargs):
        ...     return resnet18(weights=weights, zero_init_residual=True, **kwargs)
    """

    def decorator(builder: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise VelcroError(f"model name {name!r} is already registered; pick another name")
        _REGISTRY[name] = builder
        return builder

    return decorator


def available() -> list[str]:
    """Names of the registered models, sorted.

    Example:
        >>> available()[:2]
        ['googlenet', 'mobilenet_v2']
    """
    return sorted(_REGISTRY)


def create(
    name: str,
    *,
    num_classes: int = 1000,
    weights: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model, optionally loading weights from a file.

    Args:
        name: a name from :func:`available`.
        num_classes: size of the classification head.
        weights: optional ``.safetensors`` / ``.pt`` state-dict file (see :func:`load_weights`).
        **kwargs: passed to the builder (e.g. ``aux_logits`` for GoogLeNet).

    Raises:
        VelcroError: unknown name, or weights that do not fit.

    Example:
        >>> model = create("resnet18", num_classes=10)
        >>> model.fc.out_features
        10
    """
    builder = _REGISTRY.get(name)
    if builder is None:
        raise VelcroError(f"unknown model {name!r}; available models: {', '.join(available())}")
    return builder(num_classes=num_classes, weights=weights, **kwargs)


for _name, _builder in (
    ("resnet18", resnet18),
    ("resnet34", resnet34),
    ("resnet50", resnet50),
    ("mobilenet_v2", mobilenet_v2),
    ("googlenet", googlenet),
):
    register(_name)(_builder)
del _name, _builder
