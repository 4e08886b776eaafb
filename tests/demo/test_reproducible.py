"""The demo's training gives the same weights, bit for bit, in fresh processes whatever the
caller's thread settings, and leaves those settings as it found them."""

import json
import os
import subprocess
import sys

import pytest
import torch

from velcro.demo._digits_model import Recipe, weights_path

TRAIN = """
import hashlib, json, sys, torch
from velcro.data import digits
from velcro.demo._digits_model import Recipe, train
torch.set_num_threads(int(sys.argv[1]))
recipe = Recipe(size=16, epochs=2, train_images=128, batch_size=64)
split = digits.load(seed=0, size=recipe.size, test_fraction=recipe.test_fraction)
settings = lambda: [torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()]
before = settings()
model = train(recipe, split, seed=0, progress=False)
digest = hashlib.sha256()
for key, value in sorted(model.state_dict().items()):
    digest.update(key.encode())
    digest.update(value.detach().contiguous().numpy().tobytes())
print(json.dumps({"sha256": digest.hexdigest(), "before": before, "after": settings()}))
"""


def fresh_training(threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", TRAIN, str(threads)], env=env,
                          capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_training_is_bit_reproducible_across_processes_and_thread_settings():
    one, two = fresh_training(1), fresh_training(2)
    assert one["sha256"] == two["sha256"]
    for run, threads in ((one, 1), (two, 2)):
        assert run["before"] == run["after"] == [threads, False]


def test_the_cache_key_holds_everything_that_decides_the_weights(tmp_path, monkeypatch):
    key, path = Recipe().key(), weights_path(Recipe(), 0, tmp_path)
    assert Recipe().key() == key
    assert Recipe(threads=2).key() != key
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert Recipe().key() != key and weights_path(Recipe(), 0, tmp_path) != path
    monkeypatch.undo()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "OTHER")
    assert Recipe().key() != key


@pytest.mark.parametrize("enabled", [False, True])
def test_training_restores_the_callers_settings(enabled):
    from velcro.data import digits
    from velcro.demo._digits_model import train

    threads = torch.get_num_threads()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=enabled)
    try:
        recipe = Recipe(size=16, epochs=1, train_images=64, batch_size=64, threads=1)
        split = digits.load(seed=0, size=16)
        state = torch.random.get_rng_state()
        train(recipe, split, seed=0, progress=False)
        assert torch.get_num_threads() == threads
        assert torch.are_deterministic_algorithms_enabled() is enabled
        assert torch.is_deterministic_algorithms_warn_only_enabled() is enabled
        assert torch.equal(torch.random.get_rng_state(), state)
    finally:
        torch.use_deterministic_algorithms(previous)
