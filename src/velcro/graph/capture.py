"""Capture: a model as a torch.fx graph, the one representation sites, apply and trim share.

Two ways, one representation (an ``fx.GraphModule`` whose ``torch.nn`` layers stay module
calls, so that site names and module-based trimming work the same):

1. symbolic torch.fx, valid at any input size;
2. where symbolic tracing fails on Python code about shapes (``if x.shape[-2] < k``,
   TensorFlow "same" padding, a ``device.type`` test), a capture at the size of an example
   input (:mod:`velcro.graph._concrete`): shapes become constants, tensor values stay
   symbolic. Such a graph records its input shape (``velcro_capture_shape``) and checks it at
   its entry: another size raises a VelcroError instead of computing something else.

A GraphModule traced elsewhere (timm's tracer, for one) is taken as it is, except that module
calls whose class computes something else than its ``torch.nn`` base (timm's
``BatchNormAct2d``, ``Conv2dSame``) are traced into, so that nothing downstream mistakes them
for their base class.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from velcro.errors import VelcroError
from velcro.graph._concrete import ConcreteTracer, CulpritMixin, DefaultsMixin
from velcro.graph._plain import is_torch_module

CAPTURE_SHAPE = "velcro_capture_shape"


class CaptureShapeError(VelcroError):
    """An input of another size than the one a graph was captured at."""

    def __init__(self, message: str, expected: tuple[int, ...], got: tuple[int, ...]) -> None:
        super().__init__(message)
        self.expected = expected
        self.got = got


class CaptureCheck(nn.Module):
    """First node of a graph captured at one input size: refuses any other size.

    Args:
        shape: the per-image input shape the graph was captured at.
    """

    _is_impure = True  # no user, but never dead code

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(d) for d in shape)

    def forward(self, x: torch.Tensor) -> None:
        got = tuple(x.shape[1:])
        if got != self.shape:
            raise CaptureShapeError(
                f"this graph was captured at input size {'x'.join(map(str, self.shape))} "
                f"(its shape arithmetic is fixed there) and got {'x'.join(map(str, got))}; "
                "resize the images to the calibration size, or calibrate at this one",
                self.shape, got)

    def config(self) -> dict:
        return {"shape": list(self.shape)}

    @classmethod
    def from_config(cls, config: dict) -> CaptureCheck:
        return cls([int(d) for d in config["shape"]])

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class _Tracer(CulpritMixin, DefaultsMixin, fx.Tracer):
    """Symbolic fx that names the module it failed in."""


def _examples(example_inputs: object) -> tuple[torch.Tensor, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        examples: tuple = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)):
        examples = tuple(example_inputs)
    else:
        examples = ()
    if not examples or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] >= 1
                               for t in examples):
        raise VelcroError(
            "example_inputs must be an input batch (a tensor, batch axis first, at least one "
            f"image) or a tuple of them, got {type(example_inputs).__name__}"
        )
    return examples


def example_batch(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """A batch of one zero image of ``input_shape`` on the model's device and in its dtype."""
    tensor = next((t for t in list(model.parameters()) + list(model.buffers())
                   if t.is_floating_point()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    dtype = tensor.dtype if tensor is not None else torch.get_default_dtype()
    return torch.zeros(1, *(int(d) for d in input_shape), device=device, dtype=dtype)


def recorded_example(model: nn.Module, info: dict) -> torch.Tensor | None:
    """An example batch at the input shape statistics or a plan recorded (``info``), or None.

    Raises:
        VelcroError: the recorded shape is not a plausible image shape (a damaged file).
    """
    shape = info.get("input_shape") if isinstance(info, dict) else None
    if shape is None:
        return None
    if (not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 5
            or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1 << 16
                       for d in shape)
            or torch.tensor(shape, dtype=torch.float64).prod() > 1 << 28):
        raise VelcroError(
            f"the recorded input_shape {str(shape)[:60]} is not an input shape (1 to 5 sizes "
            "of at most 65536, 2**28 values in all); calibrate again to record it"
        )
    return example_batch(model, shape)


def _needs_retrace(gm: fx.GraphModule) -> bool:
    """A module call whose class computes something else than its torch.nn base."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if not is_torch_module(module) and not _is_velcro_module(module):
                return True
    return False


def _is_velcro_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith("velcro.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _failure(model: nn.Module, root: nn.Module, tracer, exc: BaseException,
             hint: str) -> VelcroError:
    where = tracer.failed_in or ""
    owner = root.get_submodule(where) if where else root
    nodes = list(tracer.graph.nodes) if getattr(tracer, "graph", None) else []
    after = f", after node '{nodes[-1].name}'" if nodes else ""
    return VelcroError(
        f"cannot trace {type(model).__name__} with torch.fx: in the forward of module "
        f"'{where or '<root>'}' ({type(owner).__name__}){after}: {_first_line(exc)}; {hint}"
    )


def trace(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
          *, copy_model: bool = True) -> fx.GraphModule:
    """Capture ``model`` as a torch.fx graph, in eval mode.

    Symbolic torch.fx first; where it fails and ``example_inputs`` are given, a capture at
    their per-image shape (shape arithmetic and control flow on shapes become constants,
    see :mod:`velcro.graph.capture`). Such a graph checks its input size when it runs.

    Args:
        model: any PyTorch module (or a GraphModule traced elsewhere).
        example_inputs: an input batch (or a tuple of them) at the size the model will run
            at; only used when symbolic tracing fails. ``velcro.calibrate`` passes its first
            batch, ``apply`` and ``trim`` the calibration size the statistics recorded.
        copy_model: trace a deep copy, so that rewriting the graph never touches ``model``.

    Returns:
        A ``GraphModule`` computing the same function, in eval mode; ``velcro_capture_shape``
        holds the per-image input shape when it was captured at one size.

    Raises:
        VelcroError: the model cannot be captured; the message names the module being traced.

    Example:
        >>> gm = trace(velcro.models.resnet18())
        >>> gm = trace(tf_style_model, example_inputs=torch.zeros(1, 3, 224, 224))
        >>> gm.velcro_capture_shape
        (3, 224, 224)
    """
    examples = _examples(example_inputs)
    if isinstance(model, fx.GraphModule):
        if _needs_retrace(model):
            try:  # understood: traced into, as velcro would have traced the original
                return _capture(model, examples, copy_model=True)
            except VelcroError:
                pass  # kept whole: such a module is opaque to sites and trimming
        gm = copy.deepcopy(model) if copy_model else model
        return gm.eval()
    return _capture(model, examples, copy_model)


def _capture(model: nn.Module, examples: tuple[torch.Tensor, ...] | None,
             copy_model: bool) -> fx.GraphModule:
    root = copy.deepcopy(model) if copy_model else model
    was_training = root.training
    root.eval()
    tracer = _Tracer()
    try:
        graph = tracer.trace(root)
    except Exception as exc:  # torch.fx raises many types; all mean "not traceable"
        if examples is None:
            raise _failure(model, root, tracer, exc, _HINT_EXAMPLE) from None
        return _trace_at(model, root, examples, was_training, copy_model)
    finally:
        if not copy_model:
            root.train(was_training)
    gm = fx.GraphModule(root, graph, type(root).__name__)
    return gm.eval()


_HINT_EXAMPLE = (
    "make that forward free of control flow on tensor values (torch.fx cannot trace `if`/loops "
    "over them) and of non-torch calls on tensors, or give example_inputs= (an input batch) "
    "to capture it at that size"
)
_HINT_VALUES = (
    "the model was captured at the example's size, so shapes were not the cause: make that "
    "forward free of control flow on tensor values (`if x.sum() > 0`, loops over a tensor) "
    "and of non-torch calls on tensors"
)


def _trace_at(model: nn.Module, root: nn.Module, examples: tuple[torch.Tensor, ...],
              was_training: bool, copy_model: bool) -> fx.GraphModule:
    """The capture at the examples' size (after symbolic tracing failed)."""
    root.eval()
    tracer = ConcreteTracer(examples)
    try:
        graph = tracer.trace(root)
    except Exception as exc:  # as above
        raise _failure(model, root, tracer, exc, _HINT_VALUES) from None
    finally:
        if not copy_model:
            root.train(was_training)
    gm = fx.GraphModule(root, graph, type(root).__name__)
    shape = tuple(examples[0].shape[1:])
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    gm.add_submodule("velcro_capture_check", CaptureCheck(shape))
    with gm.graph.inserting_after(placeholder):
        gm.graph.call_module("velcro_capture_check", (placeholder,))
    gm.graph.lint()
    gm.recompile()
    gm.meta.setdefault("_user_preserved_attributes", {})[CAPTURE_SHAPE] = shape
    setattr(gm, CAPTURE_SHAPE, shape)
    return gm.eval()

