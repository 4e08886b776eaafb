"""Fuzzing every loader: any file gives a valid object or a VelcroError, nothing else.

Valid files (a plan pair, a split, a trimmed model pair, a search summary, a sweep's points,
statistics, weights) are mutated by hypothesis: fields dropped, duplicated, retyped or
replaced by random JSON (huge integers, NaN, strings that are Python code), text cut or
nested deeply, bytes flipped, safetensors headers and values edited. For every example:

- the loader returns or raises :class:`VelcroError` (one line), never another exception;
- no code from the file runs (the payload strings would create a marker file);
- nothing in the folder is created or changed;
- memory stays bounded: the whole run has an address-space allowance of
  :data:`ALLOWANCE` above what the process had (a file declaring a 12 GiB tensor that a
  loader allocated would fail with MemoryError here).

A slower, coverage-guided fuzzer belongs in ``benchmarks/``; this runs a few hundred
examples in well under a minute.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import resource
import shutil
from pathlib import Path

import pytest
import torch
from hostile import search_summary, snapshot, sweep_point
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save, save_file
from zoo import build, images

import velcro
from velcro.data import Split
from velcro.errors import VelcroError
from velcro.models import read_state_dict
from velcro.report._inputs import read_search_summary
from velcro.report.sweep import Sweep

ALLOWANCE = 4 * 2**30
MARKER = Path("/tmp/velcro-fuzz-marker-must-not-exist")
CODE = f"__import__('pathlib').Path({str(MARKER)!r}).touch()"
PAYLOADS = [f"x={CODE}", f'a")or {CODE}#', f"a\n{CODE}", "__class__", "__globals__",
            "os.system", "builtins.eval", "torch.load", "forward", "../../etc/passwd", ""]
FUZZ = settings(max_examples=70, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(PAYLOADS))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.sampled_from(PAYLOADS), inner,
                                        max_size=4), max_leaves=8)


def _paths(tree, prefix=()):
    """Every place in a JSON tree (iteratively: a tree may be deep)."""
    found, stack = [], [(prefix, tree)]
    while stack:
        path, node = stack.pop()
        found.append(path)
        items = node.items() if isinstance(node, dict) else enumerate(node) \
            if isinstance(node, list) else ()
        stack.extend((path + (key,), value) for key, value in items)
    return found


def _mutate_tree(draw, document):
    document = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(document)
        path = draw(st.sampled_from(paths))
        if not path:
            continue
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        action = draw(st.sampled_from(["replace", "drop", "duplicate", "retype", "nest"]))
        if action == "replace":
            parent[key] = draw(SCALARS | VALUES)
        elif action == "drop":
            parent.pop(key)
        elif action == "duplicate" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        elif action == "duplicate":
            parent[draw(st.sampled_from(list(parent)))] = copy.deepcopy(parent[key])
        elif action == "retype":
            value = parent[key]
            parent[key] = draw(st.sampled_from([[value], {"v": value}, str(value)]))
        else:
            value = parent[key]
            for _ in range(draw(st.integers(1, 80))):
                value = [value]
            parent[key] = value
    return document


@st.composite
def mutated_json(draw, document):
    """The bytes of a mutated JSON document (or of something that is barely JSON)."""
    kind = draw(st.sampled_from(["tree"] * 6 + ["cut", "deep", "bytes"]))
    if kind == "tree":
        return json.dumps(_mutate_tree(draw, document)).encode()
    text = json.dumps(document).encode()
    if kind == "cut":
        start = draw(st.integers(0, len(text)))
        return text[:start] + draw(st.binary(max_size=8)) + text[start + draw(
            st.integers(0, 40)):]
    if kind == "deep":
        depth = draw(st.integers(60, 100_000))
        return b'{"format": ' + b"[" * depth + b"]" * depth + b"}"
    return draw(st.binary(max_size=200))


@st.composite
def mutated_safetensors(draw, data: bytes):
    """The bytes of a mutated safetensors file: flipped bytes, a cut, an edited header,
    edited metadata, or non-finite / negative values."""
    kind = draw(st.sampled_from(["flip", "cut", "header", "metadata", "values", "values"]))
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    if kind == "flip":
        data = bytearray(data)
        for position in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=6)):
            data[position] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "cut":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "header":
        text = json.dumps(_mutate_tree(draw, header)).encode()
        return len(text).to_bytes(8, "little") + text + data[8 + size :]
    tensors = load(data)
    metadata = header.get("__metadata__") or {}
    if kind == "metadata" and "velcro" in metadata:
        edited = draw(mutated_json(json.loads(metadata["velcro"])))
        metadata = {**metadata, "velcro": edited.decode("utf-8", "replace")}
    else:
        key = draw(st.sampled_from(sorted(tensors)))
        flat = tensors[key].reshape(-1)
        if flat.numel():
            value = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), -1.0,
                                          1e300, 2**62]))
            with contextlib.suppress(RuntimeError, OverflowError):
                flat[draw(st.integers(0, flat.numel() - 1))] = value
    return save(tensors, metadata=metadata or None)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """One valid file of each kind."""
    folder = tmp_path_factory.mktemp("seeds")
    model, shape = build("chain")
    stats = velcro.calibrate(model, images(shape, 8), progress=False)
    stats.save(folder / "s.safetensors")
    velcro.plan(stats, 0.5, granularity="channel").save(folder / "p.json")
    velcro.save_trimmed(velcro.trim(model, velcro.plan(stats, 0.5, granularity="channel")),
                        folder / "t.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "w.safetensors"))
    Split({"calibration": [("a/1.png", 0)], "validation": [("a/2.png", 0), ("b/3.png", 1)]},
          "/data", 0, {"calibration": 0.3, "validation": None}).save(folder / "split.json")
    (folder / "run.json").write_text(json.dumps(search_summary()))
    (folder / "points.json").write_text(json.dumps({
        "format": "velcro.sweep/1", "info": {},
        "points": [sweep_point(), sweep_point(images=8, correct=6, baseline_correct=8)]}))
    return folder


@pytest.fixture(scope="module", autouse=True)
def bounded_memory():
    """An address-space allowance for the whole fuzz run, restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as status:
        used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
    limit = used + ALLOWANCE if hard == resource.RLIM_INFINITY else min(hard, used + ALLOWANCE)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _attempt(load, path: Path) -> None:
    """Load ``path``: a result or a one-line VelcroError; nothing ran, nothing written."""
    before = snapshot(path.parent)
    try:
        load(path)
    except VelcroError as exc:
        assert "\n" not in str(exc), str(exc)
    assert not MARKER.exists(), "code from the file ran"
    assert snapshot(path.parent) == before


def _workspace(seeds: Path, tmp_path_factory, *names: str) -> Path:
    folder = tmp_path_factory.mktemp("case")
    for name in names:
        shutil.copy(seeds / name, folder / name)
    return folder


def _rehash(json_path: Path, tensors: bytes, rehash: bool) -> None:
    """Write a pair's tensors; with ``rehash`` the JSON's checksum follows them, so that the
    loader's deeper checks (not only the checksum) see the edit."""
    json_path.with_name(json_path.name + ".safetensors").write_bytes(tensors)
    if rehash:
        document = json.loads(json_path.read_text())
        document["tensors_sha256"] = hashlib.sha256(tensors).hexdigest()
        json_path.write_text(json.dumps(document))


JSON_LOADERS = {
    "plan": ("p.json", ["p.json.safetensors"], velcro.Plan.load),
    "split": ("split.json", [], Split.load),
    "trimmed model": ("t.json", ["t.json.safetensors"], velcro.load_trimmed),
    "search summary": ("run.json", [], read_search_summary),
    "sweep": ("points.json", [], Sweep.load),
}


@pytest.mark.parametrize("kind", sorted(JSON_LOADERS))
def test_json_loaders_give_an_object_or_a_velcro_error(seeds, tmp_path_factory, kind):
    name, companions, loader = JSON_LOADERS[kind]
    document = json.loads((seeds / name).read_text())

    @FUZZ
    @given(data=mutated_json(document))
    def run(data):
        folder = _workspace(seeds, tmp_path_factory, *companions)
        (folder / name).write_bytes(data)
        _attempt(loader, folder / name)
        shutil.rmtree(folder)

    run()


TENSOR_LOADERS = {
    "statistics": ("s.safetensors", None, velcro.Stats.load),
    "plan tensors": ("p.json.safetensors", "p.json", velcro.Plan.load),
    "trimmed-model tensors": ("t.json.safetensors", "t.json", velcro.load_trimmed),
    "weights": ("w.safetensors", None, read_state_dict),
}


@pytest.mark.parametrize("kind", sorted(TENSOR_LOADERS))
def test_safetensors_loaders_give_an_object_or_a_velcro_error(seeds, tmp_path_factory, kind):
    name, pair, loader = TENSOR_LOADERS[kind]
    data = (seeds / name).read_bytes()

    @FUZZ
    @given(edited=mutated_safetensors(data), rehash=st.booleans())
    def run(edited, rehash):
        folder = _workspace(seeds, tmp_path_factory, *([pair] if pair else []))
        if pair:
            _rehash(folder / pair, edited, rehash)
        else:
            (folder / name).write_bytes(edited)
        _attempt(loader, folder / (pair or name))
        shutil.rmtree(folder)

    run()


CONFUSIONS = (None, -1, "x", [], {}, 1e308)


@pytest.mark.parametrize("kind", sorted(JSON_LOADERS))
def test_every_field_dropped_or_retyped_gives_an_object_or_a_velcro_error(
        seeds, tmp_path_factory, kind):
    """Systematically, beside the random search: each field of each file dropped, or replaced
    by a value of each other JSON type (a trimmed model's fields: every other one, three
    ways, to keep the run short)."""
    name, companions, loader = JSON_LOADERS[kind]
    document = json.loads((seeds / name).read_text())
    paths = [p for p in _paths(document) if p]
    edits = CONFUSIONS
    if kind == "trimmed model":
        paths, edits = paths[::2], (None, {})
    folder = _workspace(seeds, tmp_path_factory, *companions)
    for path in paths:
        for edit in ("drop", *edits):
            changed = copy.deepcopy(document)
            parent = changed
            for key in path[:-1]:
                parent = parent[key]
            if edit == "drop":
                parent.pop(path[-1])
            else:
                parent[path[-1]] = copy.deepcopy(edit)
            (folder / name).write_text(json.dumps(changed))
            _attempt(loader, folder / name)


def test_the_fuzzed_loaders_accept_their_unmutated_files(seeds):
    """The seeds load: the fuzz starts from valid files, not from files refused anyway."""
    assert velcro.Plan.load(seeds / "p.json").granularity == "channel"
    assert velcro.Stats.load(seeds / "s.safetensors").count == 8
    assert Split.load(seeds / "split.json").counts() == {"calibration": 1, "validation": 2}
    x = torch.zeros(1, 3, 12, 12)
    assert velcro.load_trimmed(seeds / "t.json")(x).shape == (1, 5)
    assert read_search_summary(seeds / "run.json")["evaluations"] == 2
    assert len(Sweep.load(seeds / "points.json").points) == 2
    assert "conv1.weight" in read_state_dict(seeds / "w.safetensors")
