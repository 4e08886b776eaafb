"""``print`` of the pipeline's results is a few lines of headline figures, never tensors;
the full data stays in the attributes and in a JSON-ready ``to_dict()``."""

import json

import numpy as np
import pytest
import torch
from tinytask import one_thread, trained_task

import velcro
from velcro.data import Split
from velcro.report.sweep import sweep
from velcro.search import search, validate

MAX_CHARS = 400
MAX_LINES = 4


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def pipeline():
    task = trained_task()
    model = task["model"]
    stats = velcro.calibrate(model, task["calibration"], progress=False)
    result = search(model, stats, task["search"], granularity="channel", tolerance=0.02,
                    progress=False)
    validate(result, model, task["validation"], progress=False)
    report = velcro.evaluate(model, task["validation"], task_classes=[0, 1, 2, 3, 4],
                             progress=False)
    return {"task": task, "model": model, "stats": stats, "result": result, "report": report}


def short(text: str, max_lines: int = MAX_LINES) -> str:
    assert len(text) <= MAX_CHARS, text
    assert len(text.splitlines()) <= max_lines, text
    assert "tensor(" not in text
    return text


def percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def test_report_prints_accuracy_and_image_count(pipeline):
    report = pipeline["report"]
    labels = torch.cat([y for _, y in pipeline["task"]["validation"]]).numpy()
    with torch.no_grad():
        logits = torch.cat([pipeline["model"](x) for x, _ in pipeline["task"]["validation"]])
    hits = logits.argmax(1).numpy() == labels  # the accuracy, independently
    text = short(repr(report))
    assert str(report) == text
    assert f"top-1 {percent(hits.mean())}" in text
    assert f"on {len(labels)} images ({int(hits.sum())} correct)" in text
    assert "within the 5 task classes" in text
    assert report.hits.numel() == len(labels)  # the per-image data is still there
    assert json.loads(json.dumps(report.to_dict()))["correct"] == int(hits.sum())


def test_report_of_one_image_says_image():
    report = velcro.evaluate(torch.nn.Flatten(), [(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))],
                             progress=False)
    assert "on 1 image (1 correct)" in repr(report)


def test_plan_prints_its_saving_ratio_and_units(pipeline):
    plan = pipeline["result"].plan
    chosen = sum(int(plan.mask(n).sum()) for n in plan.sites)  # C from the masks, by hand
    total = sum(plan.mask(n).numel() for n in plan.sites)
    channels = sum(site.shape[site.channel_axis] for site in plan.sites.values())
    replaced = sum(len(site.units) for site in plan.sites.values())
    text = short(repr(plan))
    assert f"C {percent(chosen / total)}" in text
    assert f"{replaced:,} of {channels:,} channels replaced" in text
    assert f"of {len(plan.sites)} sites" in text
    document = json.loads(json.dumps(plan.to_dict()))
    assert document["saving_ratio"] == pytest.approx(chosen / total)
    site = next(iter(plan.sites))
    full = plan.to_dict(tensors=True)["sites"][0]
    assert full["units"] == plan.sites[site].units.tolist()
    assert torch.equal(torch.tensor(full["constant"]), plan.sites[site].constant)
    assert short(repr(plan.sites[site])).startswith(f"SitePlan: {len(plan.sites[site].units)} ")


def test_search_result_prints_c_objective_and_accuracies(pipeline):
    result = pipeline["result"]
    plan = result.plan
    chosen = sum(int(plan.mask(n).sum()) for n in plan.sites)
    total = sum(plan.mask(n).numel() for n in plan.sites)
    search_images = sum(len(y) for _, y in pipeline["task"]["search"])
    text = short(repr(result), max_lines=MAX_LINES + 1)  # + the guard
    assert f"C {percent(chosen / total)}" in text
    assert f"objective: C (compression-saving ratio) {percent(result.objective_value)}" in text
    assert f"search split: {search_images} images" in text
    assert f"{result.evaluations} evaluations" in text
    assert f"guard: top-1 loss within {100 * result.tolerance:.2f} pp at " \
           f"{100 * result.confidence:.0f}% confidence" in text
    state = ("nothing passed" if result.check["chosen"] is None else
             "failed, backed off" if result.check["backed_off"] else "passed")
    assert f"({result.check['images']} held back for the check: {state}" in text
    validation = result.validation
    change = validation["compressed"]["accuracy"] - validation["baseline"]["accuracy"]
    shown = f"{100 * change:.2f}".replace("-", "\u2212")
    assert f"validation: {validation['images']} images" in text and shown in text
    assert len(result.trajectory) > 0 and json.dumps(result.to_dict())


def test_stats_print_sites_elements_and_images(pipeline):
    stats, task = pipeline["stats"], pipeline["task"]
    images = sum(len(y) for _, y in task["calibration"])
    sites = velcro.find_sites(velcro.trace(pipeline["model"]))
    stats.info["model"] = "chain"
    text = short(repr(stats))
    assert f"Stats: {len(sites)} sites" in text and f"over {images} images" in text
    assert "model chain" in text
    name = sites[0].name
    site_text = short(repr(stats[name]))
    assert f"over {images} images" in site_text
    assert f"mean variance {float(stats[name].variance.mean()):.3g}" in site_text
    document = json.loads(json.dumps(stats.to_dict(tensors=True)))
    assert document["images"] == images
    np.testing.assert_array_equal(np.array(document["sites"][name]["mean"]),
                                  stats[name].mean.numpy())


def test_cost_prints_macs_and_parameters(pipeline):
    model = pipeline["model"]
    x = pipeline["task"]["validation"][0][0][:1]
    macs = []

    def count(module, inputs, output):  # MACs by hand from each layer's output
        if isinstance(module, torch.nn.Conv2d):
            macs.append(output.numel() * module.weight[0].numel())
        elif isinstance(module, torch.nn.Linear):
            macs.append(output.numel() * module.in_features)

    handles = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    result = velcro.cost(model, x)
    parameters = sum(p.numel() for p in model.parameters())
    text = short(repr(result))
    expected = sum(macs)
    scaled = (f"{expected / 1e6:.2f} M" if expected >= 1e6 else f"{expected / 1e3:.2f} k")
    assert f"{scaled} MACs" in text
    assert f"{parameters / 1e3:.2f} k parameters" in text
    assert "x".join(map(str, x.shape[1:])) in text
    assert json.loads(json.dumps(result.to_dict()))["macs"] == expected


def test_split_prints_counts(tmp_path):
    samples = [(f"a/{i}.png", i % 2) for i in range(300)]
    the_split = Split({"calibration": samples[:6], "validation": samples[6:]}, "imgs", 0)
    text = short(repr(the_split))
    assert text == "Split of 'imgs' (seed 0): 6 calibration, 294 validation images"
    assert json.loads(json.dumps(the_split.to_dict()))["counts"] == {"calibration": 6,
                                                                     "validation": 294}
    the_split.save(tmp_path / "s.json")
    assert Split.load(tmp_path / "s.json").sets == the_split.sets


def test_sweep_prints_the_maximum_c(pipeline):
    task = pipeline["task"]
    result = sweep(pipeline["model"], pipeline["stats"], task["validation"],
                   search_data=task["search"], granularities=("channel",),
                   thresholds=(0.0, 0.3, 0.6), tolerances=(), progress=False)
    lossless = [p for p in result.points if p["search_correct"] >= p["search_baseline_correct"]]
    best = max(lossless, key=lambda p: p["saving_ratio"])
    text = short(repr(result))
    assert f"max C {percent(best['saving_ratio'])} at no loss on the search split" in text
    assert f"held-out top-1 {percent(best['accuracy'])}" in text
    assert "3 points" in text
    assert json.loads(json.dumps(result.to_dict()))["points"] == result.points


def test_layer_io_prints_shapes():
    from velcro.hardware.kernels import LayerIO

    seen = LayerIO(torch.zeros(2, 64, 8, 8), None, torch.ones(2, 64, 8, 8))
    assert short(repr(seen)) == "LayerIO(input 2x64x8x8, residual None, output 2x64x8x8)"
