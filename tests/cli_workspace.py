"""A small image task on disk and a model fitted to it, for the command-line tests.

Three classes of 16 PNGs each (24x20 pixels, a class colour plus noise) in folders named by
class index, a user model module (``clitiny:factory``) and its weights, fitted here so that it
is well above chance.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file

from velcro.data import ImageFolder, Preprocess

CLASSES = 3
PER_CLASS = 16
COLOURS = [(200, 40, 40), (40, 190, 60), (50, 60, 210)]
RESIZE, CROP = 20, 16
# the command-line options that give the same preprocessing, and quiet, in-process loading
DATA_OPTIONS = ["--resize", str(RESIZE), "--crop", str(CROP), "--workers", "0",
                "--batch-size", "8", "--device", "cpu", "-q"]

MODEL_SOURCE = '''
import torch.nn as nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


def factory():
    return Tiny()
'''


@dataclass
class Workspace:
    root: Path
    data: Path
    module_dir: Path
    weights: Path

    def model(self) -> nn.Module:
        """A fresh instance of the fitted model (eval mode)."""
        if str(self.module_dir) not in sys.path:
            sys.path.insert(0, str(self.module_dir))
        module = importlib.import_module("clitiny")
        model = module.factory()
        from velcro.models import load_weights

        return load_weights(model, self.weights).eval()


def preprocess() -> Preprocess:
    return Preprocess(resize=RESIZE, crop=CROP)


def make_images(data: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for label, colour in enumerate(COLOURS):
        folder = data / str(label)
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = np.asarray(colour) + rng.normal(0, 35, (20, 24, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:02d}.png")


def build(root: Path) -> Workspace:
    """Write the images, the model module and fitted weights under ``root``."""
    data = root / "data"
    make_images(data)
    module_dir = root / "modules"
    module_dir.mkdir()
    (module_dir / "clitiny.py").write_text(MODEL_SOURCE)
    namespace: dict = {}
    exec(compile(MODEL_SOURCE, "clitiny.py", "exec"), namespace)
    torch.manual_seed(0)
    model = namespace["factory"]().eval()
    folder = ImageFolder(data, preprocess=preprocess())
    images = torch.stack([folder[i][0] for i in range(len(folder))])
    labels = torch.tensor(folder.targets)
    with torch.no_grad():
        # batch-norm statistics of the images, as training would leave them
        first = model.conv1(images)
        model.bn1.running_mean.copy_(first.mean((0, 2, 3)))
        model.bn1.running_var.copy_(first.var((0, 2, 3)))
        # the classifier fitted in closed form: least squares onto one-hot targets over the
        # random convolutional features (instant and deterministic, unlike a training loop)
        features = model.pool(model.relu2(model.conv2(model.relu1(model.bn1(first)))))
        design = torch.cat([features.flatten(1), torch.ones(len(labels), 1)], 1)
        targets = nn.functional.one_hot(labels, CLASSES).float()
        solution = torch.linalg.lstsq(design, targets).solution
        model.fc.weight.copy_(solution[:-1].T)
        model.fc.bias.copy_(solution[-1])
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.8, f"the test model did not fit its images ({accuracy:.2f})"
    weights = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return Workspace(root, data, module_dir, weights)
