"""Safe loading of model weights from ``.safetensors`` or PyTorch state-dict files.

Nothing here runs pickled code: PyTorch files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from velcro._validate import Fields, check_finite
from velcro.errors import VelcroError

__all__ = ["load_weights", "read_state_dict"]

_SHOW = 3  # how many offending keys an error message names
_RESAVE = "save it with torch.save(model.state_dict(), path) or safetensors.torch.save_file"


def _one_line(text: str, limit: int = 160) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _looks_like_safetensors(path: Path) -> bool:
    """True for a ``.safetensors`` name, or a header of <8-byte length><JSON object>."""
    if path.suffix.lower() == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < (1 << 27) and head[8:9] == b"{"


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` or PyTorch file, without running pickled code.

    A raw state dict is accepted, or a dict holding one under ``"state_dict"`` or ``"model"``;
    a leading ``"module."`` (``DataParallel``) is stripped from the keys.

    Args:
        path: the weights file.

    Returns:
        The state dict (tensors on the CPU).

    Raises:
        VelcroError: the file is missing, unreadable, holds pickled code or holds no state dict,
            or a floating-point tensor holds NaN or Inf (the message names the first key).

    Example:
        >>> torch.save(torch.nn.Linear(2, 3).state_dict(), "lin.pt")
        >>> sorted(read_state_dict("lin.pt"))
        ['bias', 'weight']
    """
    p = Path(path)
    if not p.exists():
        raise VelcroError(
            f"weights file {p} does not exist; pass the path of a .safetensors or .pt/.pth "
            "state-dict file"
        )
    if not p.is_file():
        raise VelcroError(f"weights path {p} is not a file; pass the path of a weights file")

    obj: object
    if _looks_like_safetensors(p):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise VelcroError(
                f"{p} is not a readable safetensors file ({_one_line(exc)}); re-export it, "
                f"or {_RESAVE}"
            ) from None
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # any failure means "not a plain weights file"
            raise VelcroError(
                f"{p} is not a plain weights file (it holds pickled code or is not a "
                f"PyTorch/safetensors file: {type(exc).__name__}); {_RESAVE}"
            ) from None

    if isinstance(obj, Mapping):
        for entry in ("state_dict", "model"):
            inner = obj.get(entry)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise VelcroError(
            f"{p} holds {type(obj).__name__}, not a state dict (a dict of tensors, possibly "
            f"under 'state_dict' or 'model'); {_RESAVE}"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise VelcroError(
            f"{p} is not a state dict: entries {', '.join(bad[:_SHOW])} are not named tensors; "
            f"{_RESAVE}"
        )
    fields = Fields(p, "weights file", "use weights from a model whose training did not "
                    "diverge (every floating-point value finite)")
    for key, tensor in obj.items():
        check_finite(tensor, fields, key)
    prefix = "module."
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in obj.items()}


def _ignored_keys(model: nn.Module, key: str) -> bool:
    """Keys of a file that the model declares it ignores (GoogLeNet without its aux heads
    lists ``aux1.`` and ``aux2.`` in ``ignored_weight_prefixes``)."""
    prefixes = tuple(getattr(model, "ignored_weight_prefixes", ()))
    return bool(prefixes) and key.startswith(prefixes)


def _legacy_counter(model: nn.Module, key: str) -> bool:
    """A batch-norm ``num_batches_tracked`` counter, which files saved before PyTorch 0.4.1
    lack (the CIFAR ResNet checkpoints); ``load_state_dict`` keeps the model's own then."""
    owner, _, name = key.rpartition(".")
    if name != "num_batches_tracked":
        return False
    module = model.get_submodule(owner) if owner else model
    return isinstance(module, nn.modules.batchnorm._NormBase)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _names(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def load_weights(
    model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True
) -> nn.Module:
    """Load a ``.safetensors`` or PyTorch state-dict file into ``model``, safely.

    PyTorch files are read with ``torch.load(weights_only=True)``: a file holding pickled code
    is refused, never run. A raw state dict is accepted, or a dict holding one under
    ``"state_dict"`` or ``"model"``; a leading ``"module."`` is stripped. A GoogLeNet built
    with ``aux_logits=False`` ignores the file's ``aux1.*`` / ``aux2.*`` keys. A file without
    batch norm's ``num_batches_tracked`` counters (saved before PyTorch 0.4.1) loads, and the
    model keeps its counters, as ``load_state_dict`` does.

    Args:
        model: the model to fill (in place).
        path: the weights file.
        strict: when True (default) missing and unexpected keys are errors; shape mismatches
            always are.

    Returns:
        ``model``, for chaining.

    Raises:
        VelcroError: one line naming the file, what is wrong (first missing / unexpected /
            mismatched keys) and the fix.

    Example:
        >>> from velcro.models import resnet18
        >>> torch.save(resnet18().state_dict(), "r18.pt")
        >>> model = load_weights(resnet18(), "r18.pt").eval()
    """
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not _ignored_keys(model, k)}
    own = model.state_dict()
    arch = type(model).__name__

    missing = [k for k in own if k not in state and not _legacy_counter(model, k)]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]

    problems = []
    if strict and missing:
        problems.append(f"missing keys {_names(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    if mismatched:
        shown = [f"{k} file {_shape(state[k])} vs model {_shape(own[k])}" for k in mismatched]
        problems.append(f"shape mismatch {_names(shown)}")
    if problems:
        raise VelcroError(
            f"{Path(path)} does not fit the {arch} model it was loaded into: "
            f"{'; '.join(problems)}; use the architecture and num_classes the weights were "
            "saved from"
        )
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise VelcroError(
            f"{Path(path)} could not be loaded into {arch}: {_one_line(exc)}; use the "
            "architecture the weights were saved from"
        ) from None
    return model
