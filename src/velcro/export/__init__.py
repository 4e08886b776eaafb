"""ONNX export of original, applied (constants) and trimmed models.

The model is exported as given (an eager module, or the ``fx.GraphModule`` that ``apply`` or
``trim`` return) with the exporter PyTorch maintains: ``torch.export`` captures it, the
ONNX translation follows, and onnxscript's optimiser folds constants (batch-norms into
convolutions included). Nothing is re-traced first: an eager model's optional arguments
(``is_causal=False``, ``attn_mask=None``) stay constants of the graph instead of becoming
inputs.

A trimmed model exports as static operations only (:mod:`velcro.trim._place`): bias maps
are initializers added to the convolutions' outputs, channel selections are slices or
gathers with constant indices, and sums of different channel subsets are pads or gathers
followed by an ``Add``. ``DATA_DEPENDENT_OPS`` lists what a trimmed graph never contains.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn

from velcro._io import atomic_path
from velcro.errors import VelcroError
from velcro.export._rewrite import constants_last

DEFAULT_OPSET = 18
# Operators that decide from data values where values go (or whether they run); a trimmed
# model's placements are all known when it is trimmed, so its graph has none of them.
DATA_DEPENDENT_OPS = frozenset({"NonZero", "ScatterND", "ScatterElements", "Scatter", "Where",
                                "Compress", "Unique", "TopK", "Loop", "If"})
# onnxruntime's outputs may differ from PyTorch's by float rounding (reassociated sums,
# fused batch-norms): this fraction of the output's largest magnitude.
CHECK_TOLERANCE = 1e-3


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    check: bool = True,
) -> Path:
    """Write ``model`` as an ONNX file, atomically, checked against onnxruntime.

    Works for an original model, ``velcro.apply``'s model (its constants become ``Where``
    nodes with constant masks) and ``velcro.trim``'s model (``Conv``/``Gemm``, ``Add`` of
    constant bias maps, a 1x1 ``Conv`` with a 0/1 weight where a residual sum places one
    side's channels, static ``Slice``/``Pad``/``Gather`` where other helpers place them;
    never ``NonZero`` or ``ScatterND``). The model is exported as it is, in eval mode, with
    ``torch.onnx.export(..., dynamo=True)`` and onnxscript's optimiser; its training flags
    are restored afterwards.

    Args:
        model: the module to export (not modified).
        path: the ``.onnx`` file to write; replaced only once the export (and the check)
            has succeeded.
        example_input: a batch of inputs of the shape the model runs at (batch axis first).
        opset: ONNX opset version (default 18).
        dynamic_batch: name the batch axis of the input and output ``batch`` so that any
            batch size runs; False fixes it to ``example_input``'s.
        check: run the file with onnxruntime (when installed) on ``example_input`` and
            refuse it when its outputs differ from PyTorch's by more than
            ``CHECK_TOLERANCE`` of their largest magnitude.

    Returns:
        The path written.

    Raises:
        VelcroError: the model does not run on ``example_input``, cannot be exported, or
            onnxruntime disagrees with it; or ``path`` is not writable. The message names
            the first line of the underlying failure.

    Example:
        >>> velcro.export_onnx(small, "cats.trimmed.onnx", torch.zeros(1, 3, 224, 224))
        >>> import onnxruntime
        >>> session = onnxruntime.InferenceSession("cats.trimmed.onnx")
        >>> logits = session.run(None, {"input": images.numpy()})[0]
    """
    if not isinstance(example_input, torch.Tensor) or example_input.dim() == 0:
        raise VelcroError("example_input must be a batch tensor (batch axis first), "
                          "e.g. torch.zeros(1, 3, 224, 224)")
    _require_exporter()
    opset = opset or DEFAULT_OPSET
    device = next((p.device for p in model.parameters()), example_input.device)
    example = example_input.to(device)
    path = Path(path)
    with _eval_mode(model), torch.no_grad():
        expected = _run(model, example)
        # torch.export specialises an axis of size 1: trace a batch of 2 to keep it free
        traced = example.repeat(2, *[1] * (example.dim() - 1)) if (
            dynamic_batch and example.shape[0] == 1) else example
        dynamic = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
        with atomic_path(path) as tmp:
            try:
                with warnings.catch_warnings(), _quiet_exporter():
                    warnings.simplefilter("ignore")
                    program = torch.onnx.export(
                        model, (traced,), dynamo=True, input_names=["input"],
                        output_names=["output"], dynamic_shapes=dynamic,
                        opset_version=opset, optimize=True, verbose=False)
            except Exception as exc:  # the exporter raises many types
                raise VelcroError(_failure(model, opset, exc)) from None
            written = program.model.opset_imports.get("", opset)
            if written != opset:  # the exporter falls back to its own opset with a warning
                raise VelcroError(
                    f"cannot export {type(model).__name__} to ONNX at opset {opset}: the "
                    f"exporter writes opset {written} and cannot convert the graph to {opset}; "
                    f"try opset={written} (or another opset it converts to)")
            constants_last(program.model)
            program.save(str(tmp), external_data=False)
            if check:
                _check(tmp, example, expected, type(model).__name__)
    return path


def onnxruntime_difference(path: str | os.PathLike, example: torch.Tensor,
                           expected: torch.Tensor) -> float | None:
    """Largest absolute difference between onnxruntime's output for ``example`` and
    ``expected``; None when onnxruntime is not installed.

    Args:
        path: an ONNX file with one input.
        example: the input batch.
        expected: PyTorch's output for it.

    Example:
        >>> onnxruntime_difference("m.onnx", x, model(x))
        3.1e-07
    """
    try:
        import numpy as np
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = session.run(None, {name: example.detach().cpu().float().numpy()})[0]
    want = expected.detach().cpu().float().numpy()
    if got.shape != want.shape:
        raise VelcroError(f"onnxruntime's output has shape {list(got.shape)}, PyTorch's "
                          f"{list(want.shape)}")
    return float(np.max(np.abs(got - want))) if got.size else 0.0


def _require_exporter() -> None:
    missing = [name for name in ("onnx", "onnxscript") if not _importable(name)]
    if missing:
        raise VelcroError(f"ONNX export needs the {' and '.join(missing)} package"
                          f"{'s' if len(missing) > 1 else ''}: pip install {' '.join(missing)}")


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _run(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    try:
        out = model(example)
    except Exception as exc:  # a model raises whatever its layers raise
        raise VelcroError(f"{type(model).__name__} does not run on example_input of shape "
                          f"{list(example.shape)}: {_first_line(exc)}") from None
    if not isinstance(out, torch.Tensor):
        raise VelcroError(f"{type(model).__name__} returns {type(out).__name__}, not one "
                          "tensor; export a module that returns the output tensor")
    return out


def _check(path: Path, example: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    difference = onnxruntime_difference(path, example, expected)
    if difference is None:
        return
    scale = max(float(expected.detach().abs().max()) if expected.numel() else 0.0, 1e-6)
    if not difference <= CHECK_TOLERANCE * scale:  # also catches NaN
        raise VelcroError(f"cannot export {name} to ONNX: onnxruntime's outputs differ from "
                          f"PyTorch's by {difference:.3g} (largest output {scale:.3g}); the "
                          "file was not written (check=False writes it anyway)")


def _failure(model: nn.Module, opset: int, exc: BaseException) -> str:
    """One line: what failed, its first line, and a hint only where one applies."""
    from torch.onnx._internal.exporter import _errors

    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    name = type(model).__name__
    first = _first_line(root)
    if isinstance(exc, _errors.TorchExportError):
        data = "data-dependent" in str(root).lower() or "DataDependent" in type(root).__name__
        hint = "; its forward decides on tensor values in Python" if data else ""
        return f"cannot export {name} to ONNX: torch.export cannot capture it: {first}{hint}"
    if isinstance(exc, _errors.ConversionError) and _about_opset(str(exc)):
        return (f"cannot export {name} to ONNX at opset {opset}: {first}; an operator has no "
                "translation at this opset: try another one (opset=...)")
    return f"cannot export {name} to ONNX (opset {opset}): {first}"


def _about_opset(message: str) -> bool:
    lowered = message.lower()
    return "opset" in lowered


def _first_line(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        line = " ".join(line.split())
        if line:
            return line[:300]
    return type(exc).__name__


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the export; every module's own training flag restored after."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs warnings that concern nobody here (torchvision absent) and prints
    the graphs of its failed attempts: mute them (a failure is reported in one line),
    restoring the loggers' levels after."""
    import logging

    names = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx",
             "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
