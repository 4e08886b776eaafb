"""Which modules behave exactly like a ``torch.nn`` class, and which are their own.

Trimming and site discovery rebuild, fold and slice modules by what they compute. A subclass
that changes what it computes (timm's ``BatchNormAct2d`` is a ``BatchNorm2d`` that also runs
an activation; ``Conv2dSame`` a ``Conv2d`` that pads first; ``ScaledStdConv2d`` one that
standardises its weight) must never be mistaken for its base class: ``isinstance`` is not
enough. A module is *plain* for a base class when it is an instance of it and no class of its
MRO between it and the first ``torch.nn`` class defines a method other than the ones listed in
:data:`HARMLESS` (construction, printing, initialisation, state-dict plumbing).

Example:
    >>> is_plain(nn.Conv2d(3, 8, 3), nn.Conv2d)
    True
    >>> class Same(nn.Conv2d):
    ...     def forward(self, x):
    ...         return super().forward(F.pad(x, (1, 1, 1, 1)))
    >>> is_plain(Same(3, 8, 3), nn.Conv2d)
    False
"""

from __future__ import annotations

import functools

import torch.nn as nn

# Methods a subclass may define without changing what ``forward`` computes.
HARMLESS = frozenset({
    "__init__", "__repr__", "__str__", "__setstate__", "__getstate__", "__init_subclass__",
    "extra_repr", "reset_parameters", "reset_running_stats", "_load_from_state_dict",
    "_save_to_state_dict", "_init_weights", "init_weights",
})


def _is_torch_class(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "torch"


@functools.lru_cache(maxsize=512)
def _plain_class(cls: type) -> bool:
    """``cls`` computes what its first ``torch`` ancestor computes."""
    for klass in cls.__mro__:
        if _is_torch_class(klass):
            return True
        for name, value in vars(klass).items():
            if name in HARMLESS or name.startswith("__") and name.endswith("__") and not callable(
                    value):
                continue
            if callable(value) or isinstance(value, (property, staticmethod, classmethod)):
                return False
    return True


def is_plain(module: nn.Module, classes: type | tuple[type, ...]) -> bool:
    """``module`` is an instance of ``classes`` that computes what its ``torch.nn`` class
    computes (no method of its own beyond :data:`HARMLESS`)."""
    return isinstance(module, classes) and _plain_class(type(module))


def is_torch_module(module: nn.Module) -> bool:
    """A ``torch.nn`` module, or a subclass that adds no behaviour of its own."""
    return _plain_class(type(module))


def hashable(target: object) -> bool:
    """``target`` can be looked up in a set or dict (a node's target may be any object)."""
    try:
        hash(target)
    except TypeError:
        return False
    return True
