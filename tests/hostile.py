"""Helpers for the tests that feed velcro hostile or corrupted files.

Each such test checks the same promise: a :class:`VelcroError` (no other exception), one
line that names the file and the field, and no file created, changed or left half-written
in the folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load, save

from velcro.errors import VelcroError


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def assert_refused(call: Callable[[], object], path: Path, *fields: str,
                   folder: Path | None = None) -> str:
    """``call()`` raises VelcroError naming ``path`` and each of ``fields``, on one line, and
    leaves ``folder`` (default: the file's folder) exactly as it was."""
    folder = folder or Path(path).parent
    before = snapshot(folder)
    with pytest.raises(VelcroError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    for field in fields:
        assert field in message, (field, message)
    assert snapshot(folder) == before, "the folder changed"
    return message


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    """Rewrite a JSON file after ``change(document)`` (which edits it in place)."""
    document = json.loads(Path(path).read_text())
    change(document)
    Path(path).write_text(json.dumps(document))


def edit_tensors(json_path: Path, change: Callable[[dict], object]) -> None:
    """Rewrite the tensor file of a pair, and its checksum in the JSON, so that only the
    change (not a checksum mismatch) is what the loader sees."""
    json_path = Path(json_path)
    tensor_path = json_path.with_name(json_path.name + ".safetensors")
    data = tensor_path.read_bytes()
    header_size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__")
    tensors = load(data)
    change(tensors)
    data = save(tensors, metadata=metadata)
    tensor_path.write_bytes(data)
    edit_json(json_path, lambda d: d.__setitem__("tensors_sha256",
                                                  hashlib.sha256(data).hexdigest()))


def nested(depth: int) -> str:
    """JSON nested ``depth`` levels deep."""
    return "[" * depth + "]" * depth
