"""The `velcro` command end to end on a generated image task, in process."""

import json
import math

import numpy as np
import pytest
import torch
from cli_workspace import CLASSES, DATA_OPTIONS, PER_CLASS, build, preprocess

import velcro
from velcro.data import ImageFolder, ImageLoader, Split
from velcro.plan import Plan
from velcro.stats import Stats

TINY = ["--model", "clitiny:factory"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cli"))


def loader(ws, samples):
    folder = ImageFolder(ws.data, preprocess=preprocess())
    return ImageLoader(folder.subset(samples), batch_size=8)


def test_calibrate_compress_evaluate_end_to_end(ws, cli, tmp_path):
    weights = ["--weights", ws.weights]
    stats_path, plan_path = tmp_path / "task.stats.safetensors", tmp_path / "task.plan.json"
    results_path = tmp_path / "task.eval.json"

    code, out, err = cli("calibrate", ws.data, *TINY, *weights, "--classes", "0,1,2",
                         "--calibration-fraction", "0.25", "-o", stats_path, "--json",
                         *DATA_OPTIONS)
    assert code == 0, err
    calibrated = json.loads(out)
    total = CLASSES * PER_CLASS
    calibration_count = round(0.25 * total)
    assert calibrated["split_counts"] == {"calibration": calibration_count,
                                          "validation": total - calibration_count}
    assert calibrated["calibration_images"] == calibration_count and calibrated["skipped"] == []
    assert calibrated["classes"] == [0, 1, 2] and calibrated["sites"] == 2

    # the split is saved beside the statistics: disjoint, stratified, every image once
    split = Split.load(tmp_path / "task.stats.split.json")
    calibration, validation = split["calibration"], split["validation"]
    assert not set(calibration) & set(validation)
    assert len(calibration) + len(validation) == total
    assert sorted(label for _, label in calibration) == [0] * 4 + [1] * 4 + [2] * 4

    # the statistics are those of the API on exactly the calibration images
    model = ws.model()
    reference = velcro.calibrate(model, loader(ws, calibration), progress=False)
    stats = Stats.load(stats_path)
    assert stats.count == calibration_count and stats.names == reference.names
    for name in stats.names:
        assert torch.allclose(stats[name].mean, reference[name].mean, rtol=1e-9, atol=1e-12)
        assert torch.allclose(stats[name].variance, reference[name].variance, rtol=1e-9,
                              atol=1e-12)

    code, out, err = cli("compress", "--stats", stats_path, "--thresholds", "0.3",
                         "--granularity", "channel", "-o", plan_path, "--json")
    assert code == 0, err
    compressed = json.loads(out)
    # C by hand: round(0.3 * c_k) whole channels of h_k x w_k elements per site
    chosen = total_elements = 0
    for site in stats.sites.values():
        channels, *spatial = site.shape
        chosen += math.floor(0.3 * channels + 0.5) * math.prod(spatial)
        total_elements += math.prod(site.shape)
    assert compressed["saving_ratio"] == pytest.approx(chosen / total_elements)
    plan = Plan.load(plan_path)
    assert plan.saving_ratio == pytest.approx(compressed["saving_ratio"])
    assert plan.granularity == "channel"

    code, out, err = cli("evaluate", "--split", tmp_path / "task.stats.split.json", *TINY,
                         *weights, "--plan", plan_path, "-o", results_path, "--json",
                         *DATA_OPTIONS)
    assert code == 0, err
    evaluated = json.loads(out)
    assert json.loads(results_path.read_text()) == evaluated
    assert evaluated["images"] == len(validation) and evaluated["subset"] == "validation"
    assert evaluated["classes"] == [0, 1, 2]
    # the figures are those of velcro.evaluate on the validation images
    original = velcro.evaluate(model, loader(ws, validation), task_classes=[0, 1, 2],
                               progress=False)
    applied = velcro.evaluate(velcro.apply(model, plan), loader(ws, validation),
                              task_classes=[0, 1, 2], progress=False)
    assert original.accuracy > 1 / CLASSES + 0.2  # the fitted model is well above chance
    assert evaluated["evaluated"]["accuracy"] == original.accuracy
    assert evaluated["evaluated"]["correct"] == original.correct
    assert evaluated["evaluated"]["ci95"] == list(original.ci95)
    assert evaluated["with_plan"]["accuracy"] == applied.accuracy
    assert evaluated["difference"]["difference"] == pytest.approx(
        applied.accuracy - original.accuracy)
    assert evaluated["plan"]["saving_ratio"] == pytest.approx(plan.saving_ratio)
    per_class = evaluated["evaluated"]["per_class"]
    assert sum(row["images"] for row in per_class.values()) == len(validation)

    # export the compressed model; onnxruntime computes what the applied model computes
    onnx_path = tmp_path / "task.onnx"
    code, out, err = cli("export", *TINY, *weights, "--plan", plan_path, "-o", onnx_path,
                         "--input-shape", "3,16,16", "--json", "--device", "cpu")
    assert code == 0, err
    exported = json.loads(out)
    assert exported["plan"] == str(plan_path) and exported["trimmed"] is False
    assert exported["bytes"] == onnx_path.stat().st_size
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = velcro.apply(model, plan)(x).numpy()
    np.testing.assert_allclose(onnx_outputs(onnx_path, x), expected, rtol=1e-4, atol=1e-5)


def test_thresholds_as_a_list_in_site_order_or_a_json_file(ws, cli, tmp_path):
    stats_path = tmp_path / "s.safetensors"
    code, _, err = cli("calibrate", ws.data, *TINY, "--weights", ws.weights, "-o", stats_path,
                       *DATA_OPTIONS)
    assert code == 0, err
    names = Stats.load(stats_path).names
    code, out, err = cli("compress", "--stats", stats_path, "--thresholds", "0.5,0",
                         "-o", tmp_path / "list.json", "--json")
    assert code == 0, err
    thresholds = Plan.load(tmp_path / "list.json").thresholds()
    assert thresholds[names[0]] == pytest.approx(0.5) and thresholds[names[1]] == 0.0
    mapping = tmp_path / "thresholds.json"
    mapping.write_text(json.dumps({names[1]: 0.25}))
    code, out, err = cli("compress", "--stats", stats_path, "--thresholds", mapping,
                         "-o", tmp_path / "map.json", "--json")
    assert code == 0, err
    thresholds = Plan.load(tmp_path / "map.json").thresholds()
    assert thresholds[names[0]] == 0.0 and thresholds[names[1]] == pytest.approx(0.25)
    assert json.loads(out)["sites"][1]["threshold"] == pytest.approx(0.25)


def onnx_outputs(path, x):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_trim_writes_a_smaller_model_that_evaluates_and_exports_like_apply(ws, cli, tmp_path):
    stats_path, plan_path = tmp_path / "s.safetensors", tmp_path / "p.json"
    trimmed_path, onnx_path = tmp_path / "trimmed.json", tmp_path / "trimmed.onnx"
    assert cli("calibrate", ws.data, *TINY, "--weights", ws.weights, "-o", stats_path,
               *DATA_OPTIONS)[0] == 0
    code, out, err = cli("compress", "--stats", stats_path, "--thresholds", "0.5",
                         "--granularity", "channel", "-o", plan_path, *TINY, "--weights",
                         ws.weights, "--trim", trimmed_path, "--json", "--device", "cpu")
    assert code == 0, err
    summary = json.loads(out)
    model, plan = ws.model(), Plan.load(plan_path)
    applied = velcro.apply(model, plan)
    # the saved file rebuilds, without pickle, a smaller model computing what apply computes
    trimmed = velcro.load_trimmed(trimmed_path)
    assert summary["trimmed"] == str(trimmed_path)
    assert summary["parameters"]["trimmed"] == sum(p.numel() for p in trimmed.parameters())
    assert summary["parameters"]["trimmed"] < summary["parameters"]["original"]
    # the report beside the plan holds the trimmed parameter count (counted here by hand)
    report = tmp_path / "p.report.html"
    assert summary["report"] == str(report) and (tmp_path / "p.report.md").is_file()
    assert f"{summary['parameters']['trimmed']:,}" in report.read_text(encoding="utf-8")
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = applied(x)
        torch.testing.assert_close(trimmed(x), expected, rtol=1e-4, atol=1e-5)

    everything = loader(ws, ImageFolder(ws.data).samples)
    reference = velcro.evaluate(applied, everything, task_classes=[0, 1, 2], progress=False)
    for options in (["--model", trimmed_path],
                    [*TINY, "--weights", ws.weights, "--plan", plan_path, "--trim"]):
        code, out, err = cli("evaluate", ws.data, *options, "--json", *DATA_OPTIONS)
        assert code == 0, err
        evaluated = json.loads(out)
        key = "with_plan" if "--plan" in options else "evaluated"
        assert evaluated["images"] == CLASSES * PER_CLASS
        assert evaluated[key]["correct"] == reference.correct

    code, out, err = cli("export", "--model", trimmed_path, "-o", onnx_path, "--input-shape",
                         "3,16,16", "--json", "--device", "cpu")
    assert code == 0, err
    exported = json.loads(out)
    assert exported["onnx"] == str(onnx_path) and exported["input_shape"] == [1, 3, 16, 16]
    assert exported["onnxruntime_max_abs_difference"] < 1e-4
    np.testing.assert_allclose(onnx_outputs(onnx_path, x), expected.numpy(), rtol=1e-4,
                               atol=1e-5)

    code, out, err = cli("inspect", trimmed_path, "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["kind"] == "trimmed"
    assert shown["parameters"] == summary["parameters"]["trimmed"]


def test_inspect_stats_plan_split_weights_and_models(ws, cli, tmp_path):
    stats_path, plan_path = tmp_path / "s.safetensors", tmp_path / "p.json"
    assert cli("calibrate", ws.data, *TINY, "--weights", ws.weights, "-o", stats_path,
               *DATA_OPTIONS)[0] == 0
    assert cli("compress", "--stats", stats_path, "--thresholds", "0.2", "-o",
               plan_path)[0] == 0
    stats = Stats.load(stats_path)

    code, out, err = cli("inspect", stats_path, "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["kind"] == "stats" and shown["images"] == stats.count
    for row in shown["sites"]:
        variance = stats[row["site"]].variance.numpy()
        assert row["shape"] == list(variance.shape)
        assert row["variance"]["median"] == pytest.approx(float(np.median(variance)))
        assert row["variance"]["max"] == pytest.approx(float(variance.max()))
        assert row["zero_variance"] == pytest.approx(float((variance == 0).mean()))

    code, out, _ = cli("inspect", plan_path, "--json")
    shown = json.loads(out)
    assert shown["kind"] == "plan"
    assert shown["saving_ratio"] == pytest.approx(Plan.load(plan_path).saving_ratio)
    assert [row["site"] for row in shown["sites"]] == stats.names

    code, out, _ = cli("inspect", tmp_path / "s.split.json", "--json")
    assert json.loads(out)["counts"] == Split.load(tmp_path / "s.split.json").counts()

    code, out, _ = cli("inspect", ws.weights, "--json")
    shown = json.loads(out)
    state = ws.model().state_dict()
    assert shown["kind"] == "weights" and shown["tensors"] == len(state)
    assert shown["elements"] == sum(t.numel() for t in state.values())

    # a registered model's sites and shapes at a given input size
    code, out, err = cli("inspect", "--model", "resnet18", "--input-shape", "3,64,64",
                         "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert len(shown["sites"]) == 17
    assert shown["sites"][0]["shape"] == [64, 32, 32]  # conv1 stride 2
    assert shown["sites"][-1]["shape"] == [512, 2, 2]


def test_registered_model_with_a_weights_file(ws, cli, tmp_path):
    weights = tmp_path / "r18.pt"
    torch.manual_seed(1)
    torch.save(velcro.models.create("resnet18", num_classes=3).state_dict(), weights)
    code, out, err = cli("calibrate", ws.data, "--model", "resnet18", "--num-classes", "3",
                         "--weights", weights, "--max-images", "4", "-o",
                         tmp_path / "r.safetensors", "--json", *DATA_OPTIONS)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["sites"] == 17 and summary["calibration_images"] == 1  # 2% of 48 -> 1
