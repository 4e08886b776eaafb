"""Capture at a concrete input size: shapes are numbers, tensor values stay symbolic.

Symbolic torch.fx cannot follow Python code on shapes (``if x.shape[-2] < k``, TensorFlow
"same" padding computed from the input size, ``max(math.ceil(ih / s) ...)``). This tracer
builds the same kind of graph (an ``fx.GraphModule`` whose ``torch.nn`` layers stay module
calls), but every proxy also carries the value it has when the model runs on an example
input, at two batch sizes (1 and 2):

- ``x.shape``, ``x.size(d)``, ``x.dim()``, ``x.ndim``, ``x.numel()`` and ``len(x)`` answer
  plain integers where both runs agree, so shape arithmetic and control flow on shapes run
  in Python and leave constants in the graph; a size that differs between the runs depends
  on the batch and stays a graph node (``x.size(0)``), so the graph runs at any batch size;
- ``x.dtype``, ``x.device`` and ``x.is_cuda`` answer the real ones (not ``meta``);
- tensor *values* stay symbolic: ``if x.sum() > 0`` still fails, it is never silently
  specialised to the example's branch.

The graph is valid only at the example's per-image shape; :func:`velcro.graph.trace` puts a
check of it at the graph's entry.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.proxy import TraceError

_BATCHES = (1, 2)


class ValueProxy(fx.Proxy):
    """A proxy that knows its value at both batch sizes (see the module docstring)."""

    def _values(self) -> tuple[Any, Any] | None:
        return self.tracer.values.get(self.node)

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        values = self._values()
        if values is not None and all(isinstance(v, torch.Tensor) for v in values):
            return values  # type: ignore[return-value]
        return None

    def _number(self, method: str, *args: Any) -> Any:
        """``getattr(value, method)(*args)``: a number where both runs agree, else a node."""
        tensors = self._tensors()
        if tensors is None:
            return self.tracer.create_proxy("call_method", method, (self, *args), {})
        first, second = (getattr(t, method)(*args) for t in tensors)
        if first == second:
            return first
        return self.tracer.create_proxy("call_method", method, (self, *args), {})

    def size(self, dim: int | None = None) -> Any:
        if dim is not None:
            return self._number("size", dim)
        return self.shape

    @property
    def shape(self) -> Any:  # type: ignore[override]
        tensors = self._tensors()
        if tensors is None:
            return self.tracer.create_proxy("call_function", getattr, (self, "shape"), {})
        sizes = [self._number("size", d) for d in range(tensors[0].dim())]
        if all(isinstance(s, int) for s in sizes):
            return torch.Size(sizes)
        return tuple(sizes)

    def dim(self) -> Any:
        return self._number("dim")

    @property
    def ndim(self) -> Any:  # type: ignore[override]
        return self._number("dim")

    def numel(self) -> Any:
        return self._number("numel")

    def _attribute(self, name: str) -> Any:
        tensors = self._tensors()
        if tensors is None:
            return self.tracer.create_proxy("call_function", getattr, (self, name), {})
        return getattr(tensors[0], name)

    @property
    def dtype(self) -> Any:  # type: ignore[override]
        return self._attribute("dtype")

    @property
    def device(self) -> Any:  # type: ignore[override]
        return self._attribute("device")

    @property
    def is_cuda(self) -> Any:  # type: ignore[override]
        return self._attribute("is_cuda")

    def __len__(self) -> int:
        values = self._values()
        if values is not None:
            lengths = {len(v) for v in values}  # type: ignore[arg-type]
            if len(lengths) == 1:
                return lengths.pop()
        raise TraceError("len() of a value that depends on the batch size")


class DefaultsMixin:
    """Parameters beyond the first ``inputs`` that have defaults take them, as a call with
    the inputs alone would (timm's ``forward(x, attn_mask=None, is_causal=False)``); they do
    not become graph inputs."""

    inputs = 1

    def _proxy_placeholder(self, name, concrete_args, sig, fn_for_analysis):  # noqa: ANN001
        param = sig.parameters.get(name)
        created = sum(1 for n in self.graph.nodes if n.op == "placeholder")
        if (created >= self.inputs and param is not None
                and param.default is not inspect.Parameter.empty):
            return param.default
        return super()._proxy_placeholder(name, concrete_args, sig, fn_for_analysis)


class CulpritMixin:
    """A tracer that remembers which module it is in, to name the culprit on failure."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.current: list[str] = []
        self.failed_in: str | None = None

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        self.current.append(self.path_of_module(m))  # type: ignore[attr-defined]
        try:
            return super().call_module(m, forward, args, kwargs)  # type: ignore[misc]
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.current[-1]
            raise
        finally:
            self.current.pop()


class ConcreteTracer(CulpritMixin, DefaultsMixin, fx.Tracer):
    """``fx.Tracer`` whose proxies carry values (see the module docstring)."""

    def __init__(self, examples: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self.examples = examples
        self.inputs = len(examples)
        self.values: dict[fx.Node, tuple[Any, Any]] = {}
        self.placeholders = 0
        self.running = False

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ValueProxy(node, self)

    def iter(self, obj: fx.Proxy) -> Any:
        values = self.values.get(obj.node)
        if values is not None and isinstance(values[0], (tuple, list)):
            return iter([obj[i] for i in range(len(obj))])
        return super().iter(obj)

    # -- running the model on real values beside the trace --------------------------------
    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self.running:  # a leaf's own forward, run for its value
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self.running:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):  # noqa: ANN001
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        if kind == "placeholder":
            if self.placeholders < len(self.examples):
                example = self.examples[self.placeholders]
                self.values[proxy.node] = tuple(_batch(example, n) for n in _BATCHES)
            self.placeholders += 1
        elif kind != "output":
            self.values[proxy.node] = tuple(self._run(kind, target, args, kwargs, run)
                                            for run in range(len(_BATCHES)))
        return proxy

    def _run(self, kind: str, target: Any, args: tuple, kwargs: dict, run: int) -> Any:
        def value_of(arg: Any) -> Any:
            if isinstance(arg, fx.Proxy):
                if arg.node not in self.values:
                    raise TraceError(f"no value for '{arg.node.name}'")
                return self.values[arg.node][run]
            return arg

        args = fx.node.map_aggregate(args, value_of)
        kwargs = fx.node.map_aggregate(kwargs, value_of)
        self.running = True
        try:
            with torch.no_grad():
                if kind == "call_function":
                    return target(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                if kind == "call_module":
                    return self.root.get_submodule(target)(*args, **kwargs)
                value: Any = self.root
                for atom in target.split("."):
                    value = getattr(value, atom)
                return value
        finally:
            self.running = False


def _batch(example: torch.Tensor, size: int) -> torch.Tensor:
    """``example``'s first image repeated ``size`` times."""
    first = example[:1]
    return first.expand(size, *first.shape[1:]).clone()

