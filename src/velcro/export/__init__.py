"""ONNX export of original, applied (constants) and trimmed models."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from velcro._io import atomic_path
from velcro.errors import VelcroError
from velcro.graph import trace

DEFAULT_OPSET = 17


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
) -> Path:
    """Write ``model`` as an ONNX file, atomically.

    Works for an original model, ``velcro.apply``'s model (its constants become ``Where``
    nodes) and ``velcro.trim``'s model (plain ``Conv``/``Gemm``, ``Add`` for bias maps,
    ``Gather``/``Concat`` where channels are placed). The model is exported from a traced,
    eval-mode copy with PyTorch's TorchScript-based exporter (``dynamo=False``), which
    needs no onnxscript features and keeps the batch axis dynamic.

    Args:
        model: the module to export (not modified).
        path: the ``.onnx`` file to write; replaced only once the export has succeeded.
        example_input: a batch of inputs of the shape the model runs at (batch axis first).
        opset: ONNX opset version (default 17).
        dynamic_batch: name the batch axis of the input and output ``batch`` so that any
            batch size runs; False fixes it to ``example_input``'s.

    Returns:
        The path written.

    Raises:
        VelcroError: the model cannot be traced or exported, or ``path`` is not writable.

    Example:
        >>> velcro.export_onnx(small, "cats.trimmed.onnx", torch.zeros(1, 3, 224, 224))
        >>> import onnxruntime
        >>> session = onnxruntime.InferenceSession("cats.trimmed.onnx")
        >>> logits = session.run(None, {"input": images.numpy()})[0]
    """
    if not isinstance(example_input, torch.Tensor) or example_input.dim() == 0:
        raise VelcroError("example_input must be a batch tensor (batch axis first), "
                          "e.g. torch.zeros(1, 3, 224, 224)")
    gm = trace(model)
    device = next((p.device for p in gm.parameters()), example_input.device)
    example = example_input.to(device)
    dynamic_axes = ({"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None)
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                # the TorchScript exporter is deprecated in favour of dynamo; it still is
                # the one that exports these graphs without extra dependencies
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    gm, (example,), str(tmp), dynamo=False, input_names=["input"],
                    output_names=["output"], dynamic_axes=dynamic_axes,
                    opset_version=opset or DEFAULT_OPSET, do_constant_folding=True,
                )
        except VelcroError:
            raise
        except Exception as exc:  # the exporter raises many types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise VelcroError(
                f"cannot export {type(model).__name__} to ONNX (opset "
                f"{opset or DEFAULT_OPSET}): {first}; try another opset"
            ) from None
    return path
