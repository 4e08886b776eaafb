"""The command line on real data, end to end: the pretrained CIFAR-10 ResNet-20 and 20 real
test photographs per class of CIFAR-10's cat (3) and dog (5), copied from the shared data
folder (``../shared/data/cifar10``, see its README) into a class-index folder.

calibrate records the model's own preprocessing (32x32, no resize, CIFAR's mean and std), and
evaluate and search reuse it without an option; evaluate's top-1 is checked against the model
run directly in torch on the same images. A different --mean is refused (exit 2, one line, no
traceback) unless --force-preprocess is given. Skipped only where the shared folder is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import velcro
from velcro.cli import main
from velcro.data import Split
from velcro.models import preprocess_for
from velcro.plan import Plan
from velcro.stats import Stats

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / ".." / "shared" / "data"
CIFAR = DATA / "cifar10"
WEIGHTS = CIFAR / "resnet20.safetensors"
CLASSES = (3, 5)  # cat, dog
PER_CLASS = 20
# the shared data README's preprocessing for these checkpoints, written out independently of
# velcro.models.preprocess_for
README_MEAN = (0.485, 0.456, 0.406)
README_STD = (0.229, 0.224, 0.225)
QUIET = ["--workers", "0", "--batch-size", "16", "--device", "cpu", "-q"]
OTHER_MEAN = "0.5,0.5,0.5"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """The first 20 test JPEGs of cat and dog, in ``images/<class index>/`` as in the data."""
    if not (CIFAR / "test").is_dir() or not WEIGHTS.is_file():
        pytest.skip(f"the shared data folder {DATA.resolve()} (cifar10/test and "
                    "cifar10/resnet20.safetensors) is absent; see the project README")
    root = tmp_path_factory.mktemp("cifar-real") / "images"
    for label in CLASSES:
        (root / str(label)).mkdir(parents=True)
        for source in sorted((CIFAR / "test" / str(label)).glob("*.jpg"))[:PER_CLASS]:
            shutil.copyfile(source, root / str(label) / source.name)
    return root


@pytest.fixture(scope="module")
def calibrated(images, tmp_path_factory) -> Path:
    """`velcro calibrate` with a search set; returns the statistics file."""
    stats = tmp_path_factory.mktemp("calibrated") / "catdog.stats.safetensors"
    code, _, err = run_in_process(
        "calibrate", images, "--classes", ",".join(map(str, CLASSES)),
        "--model", "cifar_resnet20", "--weights", WEIGHTS, "--calibration-fraction", "0.1",
        "--search-fraction", "0.4", "--seed", "0", "-o", stats, *QUIET)
    assert code == 0, err
    return stats


def run_in_process(*args) -> tuple[int, str, str]:
    """``velcro ARGS`` in this process; (exit code, stdout, stderr)."""
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    out, err = StringIO(), StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def torch_top1(root: Path, samples, mean=README_MEAN, std=README_STD) -> tuple[int, int]:
    """(correct, images) of the checkpoint run directly in torch: pixels / 255 normalised by
    hand with NumPy (no resize, no crop: the images are 32x32), checked against
    preprocess_for's transform on every image."""
    model = velcro.models.cifar_resnet20(num_classes=10)
    model.load_state_dict(load_file(str(WEIGHTS)))
    model.eval()
    transform = preprocess_for("cifar_resnet20")
    batch, labels = [], []
    for relative, label in samples:
        with Image.open(root / relative) as image:
            rgb = image.convert("RGB")
            pixels = np.asarray(rgb, dtype=np.float32) / np.float32(255)
            by_hand = (pixels - np.float32(mean)) / np.float32(std)
            tensor = torch.from_numpy(by_hand.transpose(2, 0, 1).copy())
            if (mean, std) == (README_MEAN, README_STD):
                torch.testing.assert_close(transform(rgb), tensor, rtol=0, atol=1e-6)
        assert tensor.shape == (3, 32, 32)
        batch.append(tensor)
        labels.append(label)
    with torch.no_grad():
        predicted = model(torch.stack(batch)).argmax(1)
    return int((predicted == torch.tensor(labels)).sum()), len(labels)


def test_calibrate_records_the_models_preprocessing(calibrated):
    info = Stats.load(calibrated).info
    recorded = info["preprocess"]
    assert recorded["resize"] is None and recorded["crop"] == [32, 32]
    assert recorded["scale"] == 255.0 and recorded["crop_fraction"] is None
    assert recorded["mean"] == pytest.approx(README_MEAN, abs=1e-12)
    assert recorded["std"] == pytest.approx(README_STD, abs=1e-12)
    assert info["input_shape"] == [3, 32, 32]
    assert info["model"] == "cifar_resnet20" and info["classes"] == list(CLASSES)
    split = Split.load(calibrated.with_name("catdog.stats.split.json"))
    assert split.info["preprocess"] == recorded
    assert sum(len(split[name]) for name in ("calibration", "search", "validation")) == \
        PER_CLASS * len(CLASSES)


def test_evaluate_reuses_it_and_matches_torch(calibrated, images):
    split_path = calibrated.with_name("catdog.stats.split.json")
    code, printed, err = run_in_process(
        "evaluate", "--split", split_path, "--model", "cifar_resnet20", "--weights", WEIGHTS,
        "--json", *QUIET)
    assert code == 0, err
    summary = json.loads(printed)
    assert summary["preprocess"] == Stats.load(calibrated).info["preprocess"]
    validation = Split.load(split_path)["validation"]
    correct, count = torch_top1(images, validation)
    assert summary["evaluated"]["images"] == count == len(validation)
    assert summary["evaluated"]["correct"] == correct
    assert summary["evaluated"]["accuracy"] == pytest.approx(correct / count, abs=1e-12)


def test_search_reuses_it(calibrated, tmp_path):
    plan_path = tmp_path / "catdog.channel.plan.json"
    code, printed, err = run_in_process(
        "search", "--stats", calibrated, "--model", "cifar_resnet20", "--weights", WEIGHTS,
        "--granularity", "channel", "--budget", "4", "--no-report", "--no-tradeoff",
        "-o", plan_path, "--json", *QUIET)
    assert code == 0, err
    recorded = Stats.load(calibrated).info["preprocess"]
    assert json.loads(printed)["preprocess"] == recorded
    plan = Plan.load(plan_path)
    assert plan.info["preprocess"] == recorded and plan.info["input_shape"] == [3, 32, 32]


def test_a_different_mean_is_refused_in_one_line(calibrated, tmp_path):
    """The installed entry point in a fresh process: exit 2, one line on stderr, nothing
    written, no traceback."""
    out = tmp_path / "refused.eval.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "velcro.cli", "evaluate", "--split",
         str(calibrated.with_name("catdog.stats.split.json")), "--model", "cifar_resnet20",
         "--weights", str(WEIGHTS), "--mean", OTHER_MEAN, "-o", str(out), *QUIET],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "--mean" in lines[0] and "0.485" in lines[0] and "--force-preprocess" in lines[0]
    assert not out.exists()


def test_force_preprocess_is_accepted_and_used(calibrated, images):
    split_path = calibrated.with_name("catdog.stats.split.json")
    code, printed, err = run_in_process(
        "evaluate", "--split", split_path, "--model", "cifar_resnet20", "--weights", WEIGHTS,
        "--mean", OTHER_MEAN, "--force-preprocess", "--json", *QUIET)
    assert code == 0, err
    summary = json.loads(printed)
    assert summary["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert summary["preprocess"]["std"] == pytest.approx(README_STD, abs=1e-12)
    correct, count = torch_top1(images, Split.load(split_path)["validation"],
                                mean=(0.5, 0.5, 0.5))
    assert (summary["evaluated"]["correct"], summary["evaluated"]["images"]) == (correct, count)
