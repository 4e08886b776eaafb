"""The demo's cached weights are input like any file: a damaged, oversized or non-finite cache
file is not loaded but trained again and replaced (and the demo says so); a recorded accuracy
that is no share in [0, 1] is measured again."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from velcro.data import digits
from velcro.demo._digits_model import Recipe, trained_model, weights_path

RECIPE = Recipe(size=16, epochs=1, train_images=64, batch_size=64)


@pytest.fixture(scope="module")
def split():
    return digits.load(seed=0, size=RECIPE.size, test_fraction=RECIPE.test_fraction)


@pytest.fixture(scope="module")
def good(tmp_path_factory, split):
    """A cache folder holding a correctly trained file (trained once for the module)."""
    folder = tmp_path_factory.mktemp("cache")
    trained = trained_model(split, recipe=RECIPE, cache=folder, progress=False)
    return folder, trained.path.read_bytes(), trained.test_accuracy


def damage(path, how):
    if how == "garbage":  # the right size, but no safetensors file
        path.write_bytes(bytes(path.stat().st_size))
    elif how == "nan":
        tensors = load_file(str(path))
        key = next(k for k, v in tensors.items() if v.is_floating_point())
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = math.nan
        save_file(tensors, str(path), metadata={"test_accuracy": "0.5"})
    elif how == "oversized":
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size + (64 << 20))  # sparse: no disk used


@pytest.mark.parametrize("how, said", [("garbage", "safetensors"), ("nan", "NaN"),
                                       ("oversized", "bytes, where the weights")])
def test_an_unusable_cache_file_is_trained_again_and_replaced(good, split, tmp_path, how,
                                                              said):
    folder, content, _ = good
    path = weights_path(RECIPE, 0, tmp_path)
    path.write_bytes(content)
    damage(path, how)
    trained = trained_model(split, recipe=RECIPE, cache=tmp_path, progress=False)
    assert not trained.from_cache
    assert trained.cache_problem is not None and said in trained.cache_problem
    # the replacement is a whole, finite file that loads from the cache next time
    again = trained_model(split, recipe=RECIPE, cache=tmp_path, progress=False)
    assert again.from_cache and again.cache_problem is None
    assert all(torch.isfinite(v).all() for v in again.model.state_dict().values()
               if v.is_floating_point())


@pytest.mark.parametrize("recorded", ["nan", "7", "-1", "inf", "text"])
def test_a_recorded_accuracy_that_is_no_share_is_measured_again(good, split, tmp_path,
                                                                recorded):
    folder, content, accuracy = good
    path = weights_path(RECIPE, 0, tmp_path)
    path.write_bytes(content)
    save_file(load_file(str(path)), str(path), metadata={"test_accuracy": recorded})
    trained = trained_model(split, recipe=RECIPE, cache=tmp_path, progress=False)
    assert trained.from_cache
    assert trained.test_accuracy == pytest.approx(accuracy)
