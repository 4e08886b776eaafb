import csv
import json

import pytest
import torch
from cli_workspace import DATA_OPTIONS, build
from PIL import Image
from tinytask import one_thread, trained_task

import velcro
from velcro.cli import main
from velcro.errors import VelcroError
from velcro.report.sweep import Sweep, sweep, zero_elements

THRESHOLDS = (0.0, 0.1, 0.2, 0.4, 0.7, 1.0)
TOLERANCES = (0.0, 0.03)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    with one_thread():
        yield


def keep_classes(batches, classes):
    """The images of some classes only: a second, narrower task on the same model."""
    kept = []
    for images, labels in batches:
        chosen = torch.isin(labels, torch.tensor(classes))
        if chosen.any():
            kept.append((images[chosen], labels[chosen]))
    return kept


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    task = trained_task()
    model = task["model"]
    sweeps = []
    for name, classes in (("all", [0, 1, 2, 3, 4]), ("two", [1, 3])):
        calibration = keep_classes(task["calibration"], classes)
        stats = velcro.calibrate(model, calibration, progress=False)
        sweeps.append(sweep(model, stats, keep_classes(task["validation"], classes),
                            search_data=keep_classes(task["search"], classes),
                            model_name="chain", task=name, thresholds=THRESHOLDS,
                            tolerances=TOLERANCES, progress=False))
    folder = tmp_path_factory.mktemp("sweep")
    result = Sweep.merge(*sweeps)
    written = result.save(folder)
    return {"task": task, "sweep": result, "folder": folder, "written": written,
            "stats": {"all": sweeps[0], "two": sweeps[1]}}


def read_points(folder):
    with open(folder / "points.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in ("saving_ratio", "accuracy", "baseline_accuracy", "zero_share"):
            row[key] = float(row[key])
        for key in ("correct", "baseline_correct", "images", "compressed_elements",
                    "search_correct", "search_baseline_correct", "search_images"):
            row[key] = int(row[key])
    return rows


def test_tables_are_recomputed_from_the_stored_points(swept):
    rows = read_points(swept["folder"])
    groups = {}
    for row in rows:
        groups.setdefault((row["task"], row["granularity"], row["method"]), []).append(row)
    assert len(groups) == 2 * 2 * 2
    tables = json.loads((swept["folder"] / "tables.json").read_text())
    maximum = {(r["task"], r["granularity"], r["method"]): r for r in tables["max_saving_ratio"]}
    gains = {(r["task"], r["granularity"], r["method"]): r for r in tables["accuracy_gain"]}
    for key, points in groups.items():
        # maximum C among plans at least as accurate as the uncompressed model on the
        # search images: chosen there, its validation top-1 is held out
        lossless = [p for p in points if p["search_correct"] >= p["search_baseline_correct"]]
        best = max(lossless, key=lambda p: p["saving_ratio"])
        assert maximum[key]["chosen_on"] == "search"
        assert maximum[key]["max_saving_ratio"] == pytest.approx(best["saving_ratio"])
        assert maximum[key]["accuracy"] == pytest.approx(best["accuracy"])
        assert maximum[key]["change"] == pytest.approx(
            (best["correct"] - best["baseline_correct"]) / best["images"])
        # largest gain in accuracy, and the (largest) C where it happens; never a loss
        change, at = max(((p["correct"] - p["baseline_correct"]) / p["images"],
                          p["saving_ratio"]) for p in points)
        if change > 0:
            assert gains[key]["gain"] == pytest.approx(change, abs=1e-12)
            assert gains[key]["saving_ratio"] == pytest.approx(at)
        else:
            assert gains[key]["gain"] is None and gains[key]["saving_ratio"] is None
    for row in tables["zero_share"]:
        shares = [p["zero_share"] for p in rows if p["task"] == row["task"]
                  and p["granularity"] == row["granularity"] and p["compressed_elements"]]
        assert (row["min_zero_share"], row["max_zero_share"]) == pytest.approx(
            (min(shares), max(shares)))
    markdown = (swept["folder"] / "tables.md").read_text()
    for row in tables["max_saving_ratio"]:
        assert f"{100 * row['max_saving_ratio']:.2f}%" in markdown


def test_points_match_an_independent_evaluation(swept):
    task, result = swept["task"], swept["sweep"]
    model = task["model"]
    stats = velcro.calibrate(model, task["calibration"], progress=False)
    validation = task["validation"]
    for point in result.points:
        if point["task"] != "all" or point["method"] != "uniform" or point["setting"] != 0.4:
            continue
        plan = velcro.plan(stats, point["setting"], granularity=point["granularity"])
        report = velcro.evaluate(velcro.apply(model, plan), validation, progress=False)
        assert (point["correct"], point["images"]) == (report.correct, report.images)
        assert point["saving_ratio"] == pytest.approx(plan.saving_ratio)
        # zero share from the statistics' means, by hand: replaced positions whose mean is 0
        compressed = zeros = 0
        for name, site in stats.sites.items():
            mask = plan.mask(name)
            compressed += int(mask.sum())
            zeros += int((site.mean.float()[mask] == 0).sum())
        assert (point["compressed_elements"], point["zero_elements"]) == (compressed, zeros)
        assert zeros > 0  # the tiny model has dead units: the count is not trivially zero
        on_search = velcro.evaluate(velcro.apply(model, plan), task["search"], progress=False)
        assert (point["search_correct"], point["search_images"]) == (on_search.correct,
                                                                     on_search.images)
    baseline = velcro.evaluate(model, validation, progress=False)
    assert {p["baseline_correct"] for p in result.points if p["task"] == "all"} == {
        baseline.correct}
    searched = [p for p in result.points if p["method"] == "search"]
    assert len(searched) == 2 * 2 * len(TOLERANCES)
    assert all(p["evaluations"] is not None and p["search_accuracy"] is not None
               for p in searched)


def test_zero_elements_of_a_channel_plan():
    plan_stats = trained_task()
    stats = velcro.calibrate(plan_stats["model"], plan_stats["calibration"], progress=False)
    plan = velcro.plan(stats, 0.5, granularity="channel")
    compressed, zeros = zero_elements(plan)
    assert compressed == sum(plan.chosen_elements(n) for n in plan.sites)
    expected = sum(int((stats.sites[n].mean.float()[plan.mask(n)] == 0).sum())
                   for n in plan.sites)
    assert zeros == expected


def test_saved_files_reload_and_the_curves_are_pngs(swept):
    folder = swept["folder"]
    names = {p.name for p in swept["written"]}
    assert {"points.json", "points.csv", "tables.json", "tables.md", "curves_chain.png"} <= names
    again = Sweep.load(folder)
    assert again.points == json.loads(json.dumps(swept["sweep"].points))
    assert again.tables() == swept["sweep"].tables()
    with Image.open(folder / "curves_chain.png") as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 250
    with pytest.raises(VelcroError, match="not a velcro sweep"):
        Sweep.load(folder / "tables.json")


def test_sweep_without_search_data_sweeps_uniform_thresholds_only():
    task = trained_task()
    stats = velcro.calibrate(task["model"], task["calibration"], progress=False)
    result = sweep(task["model"], stats, task["validation"], granularities=("channel",),
                   thresholds=(0.0, 0.5), progress=False)
    assert [(p["method"], p["setting"]) for p in result.points] == [("uniform", 0.0),
                                                                    ("uniform", 0.5)]
    # chosen on the very images it reports: the table says so instead of claiming held out
    (row,) = result.tables()["max_saving_ratio"]
    assert row["chosen_on"] == "validation"
    lossless = [p for p in result.points if p["correct"] >= p["baseline_correct"]]
    assert row["max_saving_ratio"] == max(p["saving_ratio"] for p in lossless)
    assert "chosen on those same images" in result.markdown()
    assert "not held out" in result.markdown().split("\n")[0]
    with pytest.raises(VelcroError, match="granularity 'block' is unknown"):
        sweep(task["model"], stats, task["validation"], granularities=("block",),
              progress=False)


def test_sweep_command_writes_points_tables_curves_and_a_report(tmp_path, monkeypatch, capsys):
    ws = build(tmp_path / "ws")
    monkeypatch.syspath_prepend(str(ws.module_dir))
    model = ["--model", "clitiny:factory", "--weights", str(ws.weights)]
    stats = tmp_path / "t.stats.safetensors"
    assert main(["calibrate", str(ws.data), *model, "--classes", "0,1,2",
                 "--calibration-fraction", "0.25", "--search-fraction", "0.3", "-o", str(stats),
                 *DATA_OPTIONS]) == 0
    out = tmp_path / "sweep"
    assert main(["sweep", "--stats", str(stats), *model, "--thresholds", "0,0.5,1",
                 "--tolerances", "0", "--levels", "2", "-o", str(out), *DATA_OPTIONS]) == 0
    result = Sweep.load(out)
    assert len(result.points) == 2 * (3 + 1)
    assert {"tables.md", "points.csv", "report.html", "curves_clitiny_factory.png"} <= {
        p.name for p in out.iterdir()}
    assert "Maximum compression-saving ratio" in capsys.readouterr().out
    assert main(["sweep", "--stats", str(stats), *model, "--granularity", "block",
                 "-o", str(out), *DATA_OPTIONS]) == 2
