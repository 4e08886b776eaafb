"""Weights holding NaN or Inf are refused where they enter, naming the file and first key.

A NaN weight makes every logit NaN; argmax of NaN is index 0, which can turn a task's top-1
from 0% to 100% without a word. Loading is where such a file is caught.
"""

import pytest
import torch
import torch.nn as nn
from hostile import assert_refused
from safetensors.torch import save_file

from velcro.models import load_weights, read_state_dict


def state():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    return {k: v.clone() for k, v in model.state_dict().items()}


def write(path, tensors):
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_first_key(tmp_path, suffix, value):
    tensors = state()
    tensors["1.running_var"][2] = value  # a NaN variance in a batch-norm
    tensors["0.weight"][1, 0, 2, 2] = value  # the first key in file order
    path = tmp_path / f"w{suffix}"
    write(path, tensors)
    message = assert_refused(lambda: read_state_dict(path), path, "'0.weight'", "[1, 0, 2, 2]")
    assert "1.running_var" not in message


def test_load_weights_refuses_before_touching_the_model(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = state()
    tensors["1.bias"][0] = float("nan")
    path = tmp_path / "w.safetensors"
    write(path, tensors)
    assert_refused(lambda: load_weights(model, path), path, "'1.bias'")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_finite_weights_and_integer_buffers_still_load(tmp_path):
    tensors = state()
    tensors["1.num_batches_tracked"] = torch.tensor(2**62)  # integers are never "non-finite"
    tensors["0.weight"][0, 0, 0, 0] = 3.0e38  # large but finite
    path = tmp_path / "w.pt"
    write(path, tensors)
    loaded = read_state_dict(path)
    assert set(loaded) == set(tensors)
    assert torch.equal(loaded["0.weight"], tensors["0.weight"])
