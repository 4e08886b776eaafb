"""CIFAR ResNet-20/32/44/56 against a functional re-implementation and the pretrained weights.

The accuracy tests need the shared data folder (``../shared/data`` from the repository root,
see its README) and skip only when it is absent.
"""

from __future__ import annotations

import operator
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from zoo import random_state

import velcro
from velcro import models
from velcro.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, ImageLoader
from velcro.models.cifar_resnet import CIFAR_PREPROCESS, CifarBasicBlock, PadShortcut

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / ".." / "shared" / "data"
CIFAR = DATA / "cifar10"
needs_data = pytest.mark.skipif(
    not CIFAR.is_dir(), reason=f"the shared data folder {DATA} is absent (see the project README)"
)
DEPTHS = (20, 32, 44, 56)
# Top-1 correct of each checkpoint, measured once with this definition (float32, CPU), on the
# first 30 JPEG test images of each class (300 images; no top-1 margin under 0.005, far above
# float noise) and on the 20 lossless PNGs, where the README's independent definition gets
# 20, 19, 20, 20. benchmarks/bench_models.py checks the full 10,000 against the README.
PER_CLASS = 30
SUBSET_CORRECT = {20: 244, 32: 252, 44: 250, 56: 257}
LOSSLESS_CORRECT = {20: 20, 32: 19, 44: 20, 56: 20}


def weights(depth: int) -> Path:
    return CIFAR / f"resnet{depth}.safetensors"


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """akamaster's ResNet written out with functional ops over a state dict."""

    def bn(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.batch_norm(t, state[f"{name}.running_mean"], state[f"{name}.running_var"],
                            state[f"{name}.weight"], state[f"{name}.bias"], False, 0.0, 1e-5)

    out = F.relu(bn(F.conv2d(x, state["conv1.weight"], padding=1), "bn1"))
    for stage in (1, 2, 3):
        index = 0
        while f"layer{stage}.{index}.conv1.weight" in state:
            name = f"layer{stage}.{index}"
            stride = 2 if stage > 1 and index == 0 else 1
            branch = F.relu(bn(F.conv2d(out, state[f"{name}.conv1.weight"], stride=stride,
                                        padding=1), f"{name}.bn1"))
            branch = bn(F.conv2d(branch, state[f"{name}.conv2.weight"], padding=1), f"{name}.bn2")
            if stride == 2:  # option A: subsample, zero channels on both sides
                shortcut = torch.zeros_like(branch)
                width = out.shape[1]
                shortcut[:, width // 2 : width // 2 + width] = out[:, :, ::2, ::2]
            else:
                shortcut = out
            out = F.relu(branch + shortcut)
            index += 1
    return F.linear(out.mean((2, 3)), state["linear.weight"], state["linear.bias"])


# --- structure -------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", DEPTHS)
def test_layout_sites_and_fx(depth):
    model = models.create(f"cifar_resnet{depth}")
    blocks = (depth - 2) // 6
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [blocks] * 3
    assert model.linear.out_features == 10  # the registry's CIFAR default
    assert [type(model.get_submodule(f"layer{s}.0.shortcut")).__name__ for s in (1, 2, 3)] == [
        "Identity", "PadShortcut", "PadShortcut"]
    assert model.layer3[0].shortcut.planes == 64 and model.layer3[0].shortcut.pad == 16

    gm = velcro.trace(model)
    sites = velcro.find_sites(gm)
    # the stem's ReLU and two per block (the block's one nn.ReLU, called twice)
    assert len(sites) == 6 * blocks + 1
    assert {s.kind for s in sites} == {"relu"}
    assert sites[0].name == "relu" and sites[0].producer == "conv1"
    assert [(s.name, s.producer) for s in sites[-2:]] == [
        (f"layer3.{blocks - 1}.relu:0", f"layer3.{blocks - 1}.conv1"),
        (f"layer3.{blocks - 1}.relu:1", f"layer3.{blocks - 1}.conv2"),
    ]
    calls = Counter((n.op, n.target) for n in gm.graph.nodes)
    assert calls[("call_function", F.pad)] == 2
    assert calls[("call_function", operator.add)] + calls[("call_function", operator.iadd)] == (
        3 * blocks)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gm(x), model.eval()(x))


def test_pad_shortcut_is_option_a():
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(32)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    with pytest.raises(ValueError, match="option A"):
        CifarBasicBlock(16, 64, stride=2)


@pytest.mark.parametrize("depth", [20, 32])
def test_logits_match_a_functional_reference(depth):
    model = models.create(f"cifar_resnet{depth}")
    state = random_state(model)
    model.load_state_dict(state)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference_forward(state, x),
                                   rtol=1e-4, atol=1e-4)


# --- preprocessing ---------------------------------------------------------------------------


def test_preprocess_is_imagenet_normalised_unit_pixels(tmp_path):
    assert models.preprocess_for("cifar_resnet56") == CIFAR_PREPROCESS
    assert CIFAR_PREPROCESS.resize is None and CIFAR_PREPROCESS.crop == 32
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    expected = (pixels / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    tensor = CIFAR_PREPROCESS(Image.open(path))
    np.testing.assert_allclose(tensor.numpy(), expected.transpose(2, 0, 1), atol=1e-5)


# --- the pretrained checkpoints -------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("depth", DEPTHS)
def test_state_dict_keys_are_the_files(depth):
    state = models.read_state_dict(weights(depth))
    model = models.create(f"cifar_resnet{depth}", weights=weights(depth))
    own = model.state_dict()
    # the 2017 checkpoints predate batch norm's num_batches_tracked counter
    counters = {k for k in own if k.endswith(".num_batches_tracked")}
    assert len(counters) == 6 * ((depth - 2) // 6) + 1
    assert set(own) - counters == set(state)
    assert len(state) == {20: 97, 32: 157, 44: 217, 56: 277}[depth]
    for key, value in state.items():
        assert torch.equal(own[key], value), key
    parameters = sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean",
                                                                          "running_var")))
    assert sum(p.numel() for p in model.parameters()) == parameters


def _first_per_class(folder: ImageFolder, count: int) -> ImageFolder:
    seen: dict[int, int] = defaultdict(int)
    chosen = []
    for path, label in folder.samples:
        if seen[label] < count:
            chosen.append((path, label))
            seen[label] += 1
    return folder.subset(chosen)


def correct(model: torch.nn.Module, folder: ImageFolder) -> int:
    hits = 0
    with torch.no_grad():
        for images, labels in ImageLoader(folder, batch_size=100):
            hits += int((model(images).argmax(1) == labels).sum())
    return hits


@pytest.fixture(scope="module")
def test_subset() -> ImageFolder:
    folder = ImageFolder(CIFAR / "test", preprocess=models.preprocess_for("cifar_resnet20"))
    return _first_per_class(folder, PER_CLASS)


@needs_data
@pytest.mark.parametrize("depth", DEPTHS)
def test_pretrained_accuracy(depth, test_subset):
    model = models.create(f"cifar_resnet{depth}", weights=weights(depth)).eval()
    assert Counter(test_subset.targets) == {c: PER_CLASS for c in range(10)}
    assert correct(model, test_subset) == SUBSET_CORRECT[depth]
    lossless = ImageFolder(CIFAR / "lossless20", preprocess=models.preprocess_for(
        f"cifar_resnet{depth}"))
    assert len(lossless) == 20
    assert correct(model, lossless) == LOSSLESS_CORRECT[depth]
