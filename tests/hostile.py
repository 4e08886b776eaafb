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


def sweep_point(**changes):
    """A valid sweep point (a row of points.json), with ``changes``."""
    row = {"model": "chain", "task": "cats", "granularity": "channel", "method": "uniform",
           "setting": 0.3, "saving_ratio": 0.3, "accuracy": 0.75, "correct": 3, "images": 4,
           "baseline_accuracy": 1.0, "baseline_correct": 4, "search_accuracy": None,
           "compressed_elements": 10, "zero_elements": 4, "zero_share": 0.4,
           "evaluations": None}
    row.update(changes)
    return row


def search_summary(**changes):
    """A valid search summary (NAME.search.json); ``changes`` by dotted path."""
    document = {
        "command": "search", "model": "chain", "task": "cats", "classes": [0, 1],
        "splits": {"search": 4, "validation": 4}, "plan": None, "stats": None, "cost": None,
        "granularity": "channel", "objective": "saving_ratio", "objective_value": 0.3,
        "saving_ratio": 0.3, "tolerance": 0.0, "baseline_accuracy": 0.75,
        "search_accuracy": 0.75, "search_images": 4, "evaluations": 2, "wall_time_s": 1.5,
        "thresholds": {"a": 0.3}, "settings": {"evaluations_per_phase": {"profile": 2}},
        "validation": {"images": 4, "baseline": {"accuracy": 0.5, "correct": 2, "images": 4,
                                                 "ci95": [0.1, 0.9]},
                       "compressed": {"accuracy": 0.5, "correct": 2, "images": 4},
                       "paired": {"difference": 0.0, "ci95": [-0.2, 0.2], "gained": 0,
                                  "lost": 0}},
        "trajectory": [{"phase": "baseline", "saving_ratio": 0.0, "accuracy": 0.75,
                        "feasible": True},
                       {"phase": "uniform", "saving_ratio": 0.3, "accuracy": 0.75,
                        "feasible": True}],
    }
    for key, value in changes.items():
        target = document
        *parents, last = key.split(".")
        for parent in parents:
            target = target[int(parent)] if isinstance(target, list) else target[parent]
        target[last] = value
    return document
