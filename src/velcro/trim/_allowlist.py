"""What a saved trimmed model may contain: the operations and modules a file can name.

A trimmed-model file names its operations by strings; loading resolves each string through
the dictionaries below (never by importing a name from the file), so a file can only ask for
what is listed here. The lists are derived from PyTorch by one rule, so that they cover what
real models use (timm, torchvision, user code) without listing ops by hand:

**Functions and tensor methods**: every function PyTorch declares overridable by tensor
subclasses (``torch.overrides.get_overridable_functions()``: torch's tensor functions,
``torch.nn.functional``, ``torch.linalg``, ``torch.fft``, ``torch.special`` and the methods of
``torch.Tensor``), i.e. the functions that compute on tensors, minus anything with an effect
beyond the tensors of the graph (:data:`DENIED`): files and processes (``save``, ``load``,
``from_file``), global or device state (seeds, ``set_*``, ``autocast``, ``cuda``, streams,
shared or pinned memory, raw pointers and storages, resizing), autograd hooks, callables
as arguments (``apply_``, ``map_``), random-number sampling (``rand*``, ``bernoulli``,
``normal_``, ``rrelu``...; dropout stays: an identity in eval mode) and private names
(``_*``, except ``torch._assert``). Plus the ``operator`` module's arithmetic, comparisons,
bitwise and item access (not ``setitem``/``call``/``methodcaller``), ``builtins.getattr``
restricted to the tensor attributes in :data:`ATTRIBUTES`, ``torch.Tensor.new_*`` and the
tensor factories of :data:`FACTORIES` (not overridable: they take no tensor, but models make
masks, ramps and grids with them from shapes, as timm's edgenext does).

**Modules**: every public class of ``torch.nn.modules`` except containers, lazy modules,
abstract bases, losses, classes that build submodules from counts in their arguments
(``rnn``, ``transformer``, ``MultiheadAttention``, ``AdaptiveLogSoftmaxWithLoss``) and random
samplers (``RReLU``, ``FractionalMaxPool*``); plus velcro's own trimming modules. A module
is rebuilt from its recorded constructor arguments (plain JSON values, checked at save time
to rebuild an identical module) on the ``meta`` device, and its tensors come from the
safetensors file only: never pickle, never ``extra_repr``.
"""

from __future__ import annotations

import builtins
import operator
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.modules as nn_modules
from torch.nn.modules.lazy import LazyModuleMixin

from velcro.graph.capture import CaptureCheck
from velcro.trim import _modules, _ops

DENIED = re.compile(
    r"^_(?!assert$)|seed|save|load|file|storage|share_memory|pin_memory|record_stream|hook"
    r"|backward|retain_grad|requires_grad_|^set_|^is_set_to$|resize|as_strided|data_ptr"
    r"|^(cuda|ipu|xpu|mtia|numpy|apply_|map_|map2_)$|autocast|dlpack|module_load"
    r"|rand|bernoulli|binomial|multinomial|poisson|rrelu|gumbel|fractional_max_pool|lowrank"
    r"|^(normal_|uniform_|cauchy_|exponential_|geometric_|log_normal_|random_)$"
)
OPERATORS = (
    "add sub mul truediv floordiv mod pow matmul neg pos abs invert and_ or_ xor lshift "
    "rshift eq ne lt le gt ge getitem not_ truth index concat contains iadd isub imul "
    "itruediv ifloordiv imod ipow imatmul iand ior ixor ilshift irshift iconcat"
).split()
ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "layout", "T", "mT", "H", "mH",
                        "real", "imag", "is_cuda", "requires_grad"})
EXTRA_METHODS = ("new_zeros", "new_ones", "new_full", "new_empty")
FACTORIES = ("zeros", "ones", "full", "empty", "arange", "linspace", "logspace", "eye",
             "tensor", "scalar_tensor")
# torch namespaces searched for names, in order: the first name found is the one saved.
NAMESPACES = (("torch.nn.functional", F), ("torch", torch), ("torch.linalg", torch.linalg),
              ("torch.fft", torch.fft), ("torch.special", torch.special))
DTYPES = frozenset(name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype))

_EXCLUDED_SOURCES = {"container", "rnn", "transformer", "module", "loss", "lazy"}
_EXCLUDED_MODULES = {"MultiheadAttention", "AdaptiveLogSoftmaxWithLoss", "RReLU",
                     "FractionalMaxPool2d", "FractionalMaxPool3d"}


def _callable_name(fn: object) -> str:
    return getattr(fn, "__name__", "")


def _overridable() -> tuple[set[int], set[str]]:
    """(ids of allowed torch functions, names of allowed tensor methods)."""
    functions: set[int] = set()
    methods: set[str] = set()
    for namespace, members in torch.overrides.get_overridable_functions().items():
        for fn in members:
            name = _callable_name(fn)
            if not name or DENIED.search(name) or isinstance(fn, type):
                continue
            if namespace is torch.Tensor:
                if callable(getattr(torch.Tensor, name, None)) and getattr(
                        torch.Tensor, name) is fn:
                    methods.add(name)
            else:
                functions.add(id(fn))
    functions.add(id(torch._assert))
    functions.update(id(getattr(torch, name)) for name in FACTORIES)
    for fn in _ops.CHANNELWISE_FUNCTIONS | set(_ops.SUM_FUNCTIONS) | _ops.SCALAR_FUNCTIONS:
        functions.add(id(fn))
    methods.update(EXTRA_METHODS)
    methods.update(_ops.CHANNELWISE_METHODS | _ops.REDUCE_METHODS | set(_ops.SUM_METHODS))
    return functions, methods


def _functions(allowed: set[int], methods: set[str]) -> dict[str, object]:
    names: dict[str, object] = {}
    for name in OPERATORS:
        names[f"operator.{name}"] = getattr(operator, name)
    names["builtins.getattr"] = builtins.getattr
    for prefix, namespace in NAMESPACES:
        for name in sorted(dir(namespace)):
            value = getattr(namespace, name, None)
            if id(value) in allowed and (not name.startswith("_") or name == "_assert"):
                names.setdefault(f"{prefix}.{name}", value)
    for name in sorted(methods):
        names[f"torch.Tensor.{name}"] = getattr(torch.Tensor, name)
    return names


def _module_classes() -> dict[str, type]:
    classes: dict[str, type] = {}
    for name in sorted(set(nn_modules.__all__)):
        cls = getattr(nn_modules, name)
        source = cls.__module__.rsplit(".", 1)[-1] if isinstance(cls, type) else ""
        if (not isinstance(cls, type) or not issubclass(cls, nn.Module) or name.startswith("_")
                or source in _EXCLUDED_SOURCES or name in _EXCLUDED_MODULES
                or issubclass(cls, LazyModuleMixin) or name.endswith("Base")):
            continue
        classes[name] = cls
    for cls in _modules.WITH_MAP.values():
        classes[cls.__name__] = cls
    return classes


_ALLOWED_IDS, METHODS = _overridable()
METHODS = frozenset(METHODS)
FUNCTIONS: dict[str, object] = _functions(_ALLOWED_IDS, set(METHODS))
FUNCTION_NAMES: dict[int, str] = {}
for _name, _fn in FUNCTIONS.items():
    FUNCTION_NAMES.setdefault(id(_fn), _name)
MODULES: dict[str, type] = _module_classes()
HELPERS: dict[str, type] = {cls.__name__: cls for cls in (
    _modules.ChannelSelect, _modules.ChannelSum, _modules.Materialize, CaptureCheck)}
