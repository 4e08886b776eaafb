"""Library calls leave process-wide settings as they found them: torch's thread counts,
numba's, the default dtype, grad mode, the random number generators (torch, NumPy, Python's
``random``) and the model's train/eval mode.

Some settings change only the first time something starts (numba's OpenMP pool sets the
thread count torch reads back on its first launch), which a process that already started it
would hide: each verb that might be first runs in a fresh process. Odd values are set first
(one torch thread where the machine has more, grad off, float64 default, seeded RNGs, the
model in train mode), then the verb runs, then every setting is read back.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SCRIPT = r'''
import hashlib, json, random, sys
import numpy as np
import torch
import velcro
from zoo import build

verbs = sys.argv[1].split(",")
model, _ = build("chain")
shape = (3, 32, 32)  # large enough that numba's kernel spreads over several threads
generator = torch.Generator().manual_seed(0)
images = torch.randn(24, *shape, generator=generator)
labels = torch.randint(0, 5, (24,), generator=generator)
data = [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 24, 8)]
needs_stats = any(v not in ("calibrate", "evaluate", "export_onnx", "skip_conv2d")
                  for v in verbs)
stats = velcro.calibrate(model, data, progress=False) if needs_stats else None
channel_plan = velcro.plan(stats, 0.3, granularity="channel") if needs_stats else None
if "load_trimmed" in verbs:
    velcro.save_trimmed(velcro.trim(model, channel_plan, input_shape=shape),
                        sys.argv[2] + "/t.json")

def digest(value):
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]

def settings(ask_numba=True):
    found = {
        "torch threads": torch.get_num_threads(),
        "torch interop threads": torch.get_num_interop_threads(),
        "default dtype": str(torch.get_default_dtype()),
        "grad enabled": torch.is_grad_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "matmul precision": torch.get_float32_matmul_precision(),
        "torch rng": digest(torch.get_rng_state().tolist()),
        "numpy rng": digest(np.random.get_state()[1].tolist()),
        "python rng": digest(random.getstate()),
        "model training": model.training,
    }
    if ask_numba:  # read last: asking numba starts its threading layer
        import numba
        found["numba threads"] = numba.get_num_threads()
    return found

def run(verb):
    if verb == "calibrate":
        velcro.calibrate(model, data, progress=False)
    elif verb == "evaluate":
        velcro.evaluate(model, data, progress=False)
    elif verb == "plan":
        velcro.plan(stats, 0.3)
    elif verb == "apply":
        velcro.apply(model, channel_plan)(images[:2].float())
    elif verb == "trim":
        velcro.trim(model, channel_plan, input_shape=shape)(images[:2].float())
    elif verb == "load_trimmed":
        velcro.load_trimmed(sys.argv[2] + "/t.json")(images[:2].float())
    elif verb == "search":
        velcro.search(model, stats, data, granularity="channel", budget=6, progress=False)
    elif verb == "sweep":
        velcro.sweep(model, stats, data, search_data=data, thresholds=(0.0, 0.5),
                     tolerances=(0.0,), granularities=("channel",), budget=4, progress=False)
    elif verb == "export_onnx":
        velcro.export_onnx(model, sys.argv[2] + "/m.onnx", images[:1].float())
    elif verb == "skip_conv2d":
        conv = model.conv1.float()
        mask = torch.zeros(8, 32, 32, dtype=torch.bool)
        mask[:2] = True
        velcro.kernels.skip_conv2d(images[:2].float(), conv, mask, torch.zeros(8, 32, 32))

found = {}
for verb in verbs:
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    torch.set_default_dtype(torch.float32)
    if verb not in ("trim", "load_trimmed"):
        # (trim's probe input and load_trimmed's modules follow the default dtype and then
        # do not run on float32 models: a separate bug of trimming, left to its owners)
        torch.set_default_dtype(torch.float64)
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    model.train()
    from numba.core import config as numba_config
    before = settings(ask_numba=False)
    before["numba threads"] = numba_config.NUMBA_NUM_THREADS  # the default, not yet started
    run(verb)
    found[verb] = {"before": before, "after": settings()}
print(json.dumps(found))
'''

# Verbs that could be the first to start numba run alone, in a fresh process; the others
# share one whose set-up has calibrated already (numba started), their settings reset and
# read back around each.
GROUPS = [("calibrate",), ("evaluate",), ("export_onnx",), ("skip_conv2d",),
          ("plan", "apply", "trim", "load_trimmed", "search", "sweep")]


@functools.cache
def settings_around(group: tuple[str, ...]) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="velcro_global_state_"))
    script = folder / "verbs.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), ",".join(group), str(folder)], capture_output=True,
        text=True, timeout=600, cwd=folder,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])})
    shutil.rmtree(folder, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("verb", [verb for group in GROUPS for verb in group])
def test_a_verb_leaves_global_settings_as_it_found_them(verb):
    if verb == "export_onnx":
        pytest.importorskip("onnx")
    group = next(group for group in GROUPS if verb in group)
    found = settings_around(group)[verb]
    changed = {key: (value, found["after"][key]) for key, value in found["before"].items()
               if found["after"][key] != value}
    assert changed == {}, f"velcro.{verb} changed: {changed}"
