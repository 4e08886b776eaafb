"""The API side of preprocessing as data: velcro.calibrate records what an ImageLoader's images
went through, and velcro.data.loader_for reads a split's images the same way again."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import velcro
from velcro.data import (
    ImageFolder,
    ImageLoader,
    Preprocess,
    Split,
    loader_for,
    preprocess_differences,
    recorded_preprocess,
    split,
)
from velcro.errors import VelcroError

CALIBRATED = Preprocess(resize=None, crop=12, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("recorded")
    rng = np.random.default_rng(0)
    for label in range(3):
        (root / "images" / str(label)).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / str(label) / f"{i}.png")
    folder = ImageFolder(root / "images", preprocess=CALIBRATED)
    parts = split(folder.samples, {"calibration": 0.25, "validation": None}, seed=0,
                  labels=folder.targets)
    the_split = Split(parts, str(folder.root), 0, {"calibration": 0.25, "validation": None},
                      {"classes": folder.classes, "class_to_index": folder.class_to_index})
    the_split.save(root / "task.split.json")
    model = small_model()
    stats = velcro.calibrate(model, ImageLoader(folder.subset(parts["calibration"])),
                             progress=False)
    return root, model, stats


def test_calibrate_records_the_loaders_preprocessing_and_input_shape(task):
    _, _, stats = task
    assert stats.info["preprocess"] == CALIBRATED.to_dict()
    assert stats.info["input_shape"] == [3, 12, 12]
    assert recorded_preprocess(stats) == CALIBRATED
    # and it survives the file
    root = task[0]
    stats.save(root / "s.stats.safetensors")
    assert recorded_preprocess(velcro.Stats.load(root / "s.stats.safetensors")) == CALIBRATED


def test_loader_for_reads_the_split_as_calibration_did(task):
    root, model, stats = task
    loader = loader_for(stats, root / "task.split.json")
    images, labels = next(iter(loader))
    assert images.shape[1:] == (3, 12, 12)
    # the same tensors as an ImageFolder built by hand with the calibration's preprocessing
    the_split = Split.load(root / "task.split.json")
    by_hand = ImageFolder(root / "images", preprocess=CALIBRATED).subset(
        the_split["validation"])
    expected = torch.stack([by_hand[i][0] for i in range(len(images))])
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    assert labels.tolist() == [label for _, label in the_split["validation"][:len(labels)]]
    # another subset, and every image of the split
    assert len(loader_for(stats, root / "task.split.json", subset="calibration").dataset) == 6
    assert len(loader_for(stats, root / "task.split.json", subset=None).dataset) == 24
    # a folder instead of a split: every image of the task's classes
    assert len(loader_for({"preprocess": CALIBRATED.to_dict()}, root / "images").dataset) == 24


def test_loader_for_refuses_other_preprocessing_unless_forced(task):
    root, _, stats = task
    other = Preprocess(resize=None, crop=12)  # ImageNet's mean and std
    with pytest.raises(VelcroError, match=r"--mean 0.485,0.456,0.406 \(not 0.4,0.5,0.6\)"):
        loader_for(stats, root / "task.split.json", preprocess=other)
    forced = loader_for(stats, root / "task.split.json", preprocess=other, force=True)
    assert forced.dataset.preprocess == other
    # the same preprocessing given explicitly is no conflict
    assert loader_for(stats, root / "task.split.json", preprocess=CALIBRATED).dataset \
        .preprocess == CALIBRATED
    with pytest.raises(VelcroError, match="records no preprocessing"):
        loader_for({}, root / "task.split.json")
    with pytest.raises(VelcroError, match="recorded preprocessing is not valid"):
        loader_for({"preprocess": {"crop": -3}}, root / "task.split.json")


def test_differences_name_options_and_values():
    assert preprocess_differences(Preprocess(crop=32, resize=None), Preprocess()) == [
        "--resize none (not 256)", "--crop 32x32 (not 224x224)"]
    assert preprocess_differences(Preprocess(), Preprocess()) == []
