"""Coverage-guided fuzzing of velcro's file loaders with atheris (slow: not in `make test`).

``tests/test_fuzz_loaders.py`` runs a few hundred structured hypothesis examples in the test
suite; this script runs libFuzzer (through atheris) for as long as asked, guided by the
coverage of velcro's own code. Each input picks a loader (plan, split, trimmed model, search
summary, sweep, statistics, weights) and either raw bytes, structured edits of a valid file
(a field replaced by a value of another type, dropped, or nested), or bytes flipped in it.
Any exception other than :class:`velcro.VelcroError`, a multi-line error message, code from
the file running (a marker file appearing) or a file changed in the folder is a crash, and
libFuzzer saves the input that caused it.

    .venv/bin/pip install "torch==2.13.0" atheris
    .venv/bin/python benchmarks/fuzz_loaders.py -max_total_time=600       # ten minutes
    .venv/bin/python benchmarks/fuzz_loaders.py crash-<hash>              # replay one input
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

# _moments and kernels are numba-compiled: instrumenting them would break compilation
with atheris.instrument_imports(include=["velcro"], exclude=["velcro._moments",
                                                            "velcro.hardware.kernels"]):
    import velcro
    from velcro.data import Split
    from velcro.errors import VelcroError
    from velcro.models import read_state_dict
    from velcro.report._inputs import read_search_summary
    from velcro.report.sweep import Sweep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hostile import search_summary, snapshot, sweep_point  # noqa: E402
from zoo import build, images  # noqa: E402

ROOT = Path(tempfile.mkdtemp(prefix="velcro-fuzz-"))
SEEDS, WORK = ROOT / "seeds", ROOT / "work"
MARKER = ROOT / "marker-must-not-exist"
CODE = f"__import__('pathlib').Path({str(MARKER)!r}).touch()"
PAYLOADS = [None, True, -1, 2**70, 1e308, "", "x", f"x={CODE}", f'a")or {CODE}#', "__class__",
            "os.system", [], {}, [[[[]]]], {"node": "x"}, {"dtype": "float32"}]
# kind -> (file fuzzed, files it comes with, loader)
LOADERS = [
    ("p.json", ["p.json.safetensors"], velcro.Plan.load),
    ("split.json", [], Split.load),
    ("t.json", ["t.json.safetensors"], velcro.load_trimmed),
    ("run.json", [], read_search_summary),
    ("points.json", [], Sweep.load),
    ("s.safetensors", [], velcro.Stats.load),
    ("w.safetensors", [], read_state_dict),
]


def make_seeds() -> None:
    from safetensors.torch import save_file

    SEEDS.mkdir(parents=True)
    model, shape = build("chain")
    stats = velcro.calibrate(model, images(shape, 8), progress=False)
    stats.save(SEEDS / "s.safetensors")
    plan = velcro.plan(stats, 0.5, granularity="channel")
    plan.save(SEEDS / "p.json")
    velcro.save_trimmed(velcro.trim(model, plan), SEEDS / "t.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(SEEDS / "w.safetensors"))
    Split({"calibration": [("a/1.png", 0)], "validation": [("a/2.png", 0), ("b/3.png", 1)]},
          "/data", 0, {"calibration": 0.3, "validation": None}).save(SEEDS / "split.json")
    (SEEDS / "run.json").write_text(json.dumps(search_summary()))
    (SEEDS / "points.json").write_text(json.dumps({"format": "velcro.sweep/1",
                                                   "points": [sweep_point()]}))


def places(tree) -> list:
    found, stack = [], [((), tree)]
    while stack:
        path, node = stack.pop()
        found.append(path)
        items = node.items() if isinstance(node, dict) else enumerate(node) \
            if isinstance(node, list) else ()
        stack.extend((path + (k,), v) for k, v in items)
    return found


def edited_json(seed: bytes, fdp: atheris.FuzzedDataProvider) -> bytes:
    document = json.loads(seed)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        path = fdp.PickValueInList(places(document))
        if not path:
            continue
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        action = fdp.ConsumeIntInRange(0, 3)
        if action == 0:
            parent.pop(path[-1])
        elif action == 1:
            parent[path[-1]] = copy.deepcopy(fdp.PickValueInList(PAYLOADS))
        elif action == 2:
            parent[path[-1]] = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 30))
        else:
            parent[path[-1]] = fdp.ConsumeInt(8) if fdp.ConsumeBool() else fdp.ConsumeFloat()
    return json.dumps(document).encode()


def flipped(seed: bytes, fdp: atheris.FuzzedDataProvider) -> bytes:
    data = bytearray(seed)
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        data[fdp.ConsumeIntInRange(0, len(data) - 1)] = fdp.ConsumeIntInRange(0, 255)
    return bytes(data)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    name, companions, loader = LOADERS[fdp.ConsumeIntInRange(0, len(LOADERS) - 1)]
    seed = (SEEDS / name).read_bytes()
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:
        content = fdp.ConsumeBytes(fdp.remaining_bytes())
    elif mode == 1 and name.endswith(".json"):
        content = edited_json(seed, fdp)
    else:
        content = flipped(seed, fdp)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    for companion in companions:
        shutil.copy(SEEDS / companion, WORK / companion)
    (WORK / name).write_bytes(content)
    before = snapshot(WORK)
    try:
        loader(WORK / name)
    except VelcroError as exc:
        if "\n" in str(exc):
            raise AssertionError(f"a multi-line error: {exc!r}") from None
    if MARKER.exists():
        raise AssertionError("code from the file ran")
    if snapshot(WORK) != before:
        raise AssertionError("the loader changed the folder")


if __name__ == "__main__":
    make_seeds()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
